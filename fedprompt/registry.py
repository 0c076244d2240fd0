"""The methods ``fedprompt run`` can simulate, and where each one's pieces live.

A method plugs into the shared ClientApp / ServerApp (``client_app.py``, ``server_app.py``) and the
launcher (``run.py``) with four callables, named as ``"module:attribute"`` so that importing this
registry imports no method (and no torch):

- ``config``: a class whose ``from_dict(cfg.method)`` validates the ``method`` node and returns its typed
  config (unknown keys and bad values raise :class:`~fedprompt.errors.ConfigError`);
- ``client``: ``train(msg, context, cfg) -> Message``, one client's work in one round; it raises on
  failure and the ClientApp turns that into an error reply that carries no client data;
- ``server``: ``run_server(grid, cfg) -> dict``, the whole server side (strategy, evaluation, results);
  the dict is the run's summary (``summary.json``);
- ``checks``: ``check(cfg) -> dict``, the method's own checks before anything starts (models it needs,
  the service it talks to); returns facts to record in the run folder.

``privacy`` lists the mechanisms (``privacy.name``, see ``fedprompt.schema.PRIVACY``) the method implements.
Every method's server runs its rounds through the shared round driver, ``fedprompt.fl.rounds.RoundDriver``
(every ``federation.*`` key honoured alike, a checkpoint every round, so the run is resumable:
``resume=true``); its clients keep cross-round state only in ``context.state`` (docs/experiments.md, "Resume").
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

from fedprompt.errors import ConfigError


@dataclass(frozen=True)
class FederatedMethod:
    name: str
    config: str
    client: str
    server: str
    checks: str
    privacy: tuple[str, ...] = ("none",)

    def load(self, part: str) -> Callable[..., Any]:
        module, _, attribute = getattr(self, part).partition(":")
        return getattr(import_module(module), attribute)


METHODS: dict[str, FederatedMethod] = {
    "feddtpt": FederatedMethod(
        "feddtpt",
        config="fedprompt.methods.feddtpt:FedDTPTConfig",
        client="fedprompt.fl.feddtpt.client:train",
        server="fedprompt.fl.feddtpt.server:run_server",
        checks="fedprompt.fl.feddtpt.server:check",
    ),
    "post": FederatedMethod(
        "post",
        config="fedprompt.methods.post:POSTConfig",
        client="fedprompt.fl.post.client:train",
        server="fedprompt.fl.post.server:run_server",
        checks="fedprompt.fl.post.server:check",
    ),
    "rapt": FederatedMethod(
        "rapt",
        config="fedprompt.methods.rapt:RAPTConfig",
        client="fedprompt.fl.rapt.client:train",
        server="fedprompt.fl.rapt.server:run_server",
        checks="fedprompt.fl.rapt.server:check",
    ),
    "bbt": FederatedMethod(
        "bbt",
        config="fedprompt.methods.bbt:BBTConfig",
        client="fedprompt.fl.bbt.client:train",
        server="fedprompt.fl.bbt.server:run_server",
        checks="fedprompt.fl.bbt.server:check",
    ),
    "bdpl": FederatedMethod(
        "bdpl",
        config="fedprompt.methods.bdpl:BDPLConfig",
        client="fedprompt.fl.bdpl.client:train",
        server="fedprompt.fl.bdpl.server:run_server",
        checks="fedprompt.fl.bdpl.server:check",
    ),
}


def federated_method(name: Any) -> FederatedMethod:
    if name not in METHODS:
        raise ConfigError(f"fedprompt run supports method={' | '.join(METHODS)}, got {name!r}")
    return METHODS[str(name)]
