"""Flower (Message API) adapters: they only move records; the algorithms live in ``fedprompt.methods``.

- ``client_app.app`` / ``server_app.app``: the ClientApp and ServerApp of every method; they dispatch on
  ``method.name`` through the registry in ``methods.py``
- ``<method>/``: one folder per method: its client, server (strategy, evaluation, results) and records
- ``records``: the record names every method shares; ``config``: the config's trip through the run config
- ``run.cmd_run`` / ``launch``: ``fedprompt run``, a simulation on Ray through ``flwr run``; ``tree``: its
  processes, stopped as one (a watchdog if the launcher dies); ``status``: the run folder's status.json
- ``deploy``: ``fedprompt deploy``, the same apps on a SuperLink and SuperNodes over TLS (this machine, or a
  running SuperLink); docs/deployment.md
- ``report``: the run folder's per-round JSON/CSV, plot and summary
"""
