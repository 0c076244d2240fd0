"""The ServerApp of every method: it reads the run's config and runs the method's server side."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedprompt.registry import federated_method
    from fedprompt.runs.run_config import config_from_run_config

    cfg = config_from_run_config(context.run_config)
    federated_method(cfg.method.name).load("server")(grid, cfg)
