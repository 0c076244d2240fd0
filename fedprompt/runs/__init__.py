"""What a run reads and writes, without Flower: its config on the way into the apps (``run_config``), each side's
data (``data``, ``node_data``: a SuperNode reads only its own partition), the run folder's report and the result
protocol (``report``, ``protocol``), and the Flower-free part of resume (``resume``). The Flower side (fedprompt.fl)
builds on these; the launchers (fedprompt.commands) use them without importing Flower.
"""
