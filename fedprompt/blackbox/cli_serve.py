"""``fedprompt serve``: the black-box LLM service in the foreground until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading

from omegaconf import DictConfig

from fedprompt.blackbox.settings import ServerSettings
from fedprompt.errors import ConfigError


def cmd_serve(cfg: DictConfig) -> dict:
    from fedprompt.models.registry import check_model_name, resolve_device, resolve_dtype

    # Everything that can be wrong with the command line fails here, before the model loads.
    check_model_name(str(cfg.model.name))
    resolve_dtype(cfg.model.get("dtype"), resolve_device(cfg.model.get("device")))
    settings = ServerSettings.from_config(cfg)
    from fedprompt.blackbox.accounting import Accountant

    accountant = Accountant.from_settings(settings.api_keys_file, settings.api_keys_env, settings.budget)
    if not accountant.auth_required and settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"fedprompt serve: warning: no API keys and host {settings.host}: anyone who can reach this port can "
              "use the model; set service.api_keys_file or $FEDPROMPT_API_KEYS", file=sys.stderr)

    from fedprompt.blackbox.runner import ServiceServer, uvicorn_config
    from fedprompt.blackbox.server import create_app

    app = create_app(str(cfg.model.name), settings, device=cfg.model.get("device"), dtype=cfg.model.get("dtype"),
                     accountant=accountant)
    server = ServiceServer(uvicorn_config(app, settings.host, settings.port, settings.log_level,
                                           settings.tls_certfile, settings.tls_keyfile))
    _announce(server, settings, accountant.auth_required)
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op SIGTERM handler and a
    # caught KeyboardInterrupt let the command return its summary instead of dying on that signal.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except OSError as err:  # port in use, address not available
        raise ConfigError(f"cannot serve on {settings.host}:{settings.port}: {err}") from None
    if not server.started:
        raise ConfigError(f"the server did not start on {settings.host}:{settings.port} (port in use? see the log above)")
    if app.state.worker_stopped is False:  # one forward pass outlasted the wait (service shutdown, docs/blackbox.md)
        print("fedprompt serve: warning: the model was still inside a forward pass at exit", file=sys.stderr)
    engine = app.state.engine
    return {"served": engine.model_id, "host": settings.host, "port": settings.port,
            "forward_calls": engine.forward_calls, "texts_scored": engine.texts_scored,
            "usage": accountant.reports()}


def _announce(server, settings: ServerSettings, auth: bool) -> None:
    """Print the address once uvicorn has bound it (port 0 picks one)."""
    startup = server.startup

    async def startup_and_announce(sockets=None):
        await startup(sockets=sockets)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
            print(f"fedprompt serve: {settings.model_id} on {settings.scheme}://{settings.host}:{port} "
                  f"(auth {'on' if auth else 'off'}; Ctrl-C stops)", file=sys.stderr, flush=True)

    server.startup = startup_and_announce


def main(argv: list[str] | None = None) -> int:
    """``python -m fedprompt.blackbox.cli_serve CONFIG.yaml``: serve a whole composed config. ``fedprompt deploy``
    starts its service this way, so every ``service.*`` setting of the deploy command reaches the service."""
    import json

    from omegaconf import OmegaConf

    from fedprompt.errors import FedPromptError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedprompt.blackbox.cli_serve CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        cfg = OmegaConf.load(args[0])
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"{args[0]} holds a list; a config is a mapping")
        print(json.dumps(cmd_serve(cfg)), flush=True)
    except FedPromptError as err:
        print(f"fedprompt serve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
