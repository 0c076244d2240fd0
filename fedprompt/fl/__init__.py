"""Flower (Message API) adapters: they only move records; the algorithms live in ``fedprompt.methods``.

- ``client_app.app``: ClientApp, ``train`` = one client's FedDTPT search against the black box
- ``server_app.app``: ServerApp, the strategy plus a central evaluation every round and the results
- ``strategy.FedDTPTStrategy``: Message-API strategy around ``FedDTPTAggregator``
- ``records``: the message layout; ``config``: the config's trip through the run config
- ``run.cmd_run`` / ``launch``: ``fedprompt run``, a simulation on Ray through ``flwr run``
"""
