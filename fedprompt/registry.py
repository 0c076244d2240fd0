"""The methods ``fedprompt run`` can simulate, and where each one's pieces live.

A method is its config class and its Flower adapter, named by string so that importing this registry imports
no method (and no torch):

- ``config``: ``"module:Class"``, whose ``from_dict(cfg.method)`` validates the ``method`` node and returns its
  typed config (unknown keys and bad values raise :class:`~fedprompt.errors.ConfigError`);
- ``adapter``: the module ``fedprompt.fl.<name>``, which the shared ClientApp / ServerApp (``client_app.py``,
  ``server_app.py``) and the launcher (``run.py``) call through three names:
  ``train(msg, context, cfg) -> Message``, one client's work in one round (it raises on failure and the
  ClientApp turns that into an error reply that carries no client data); ``run_server(grid, cfg) -> dict``, the
  server side through the round template (``fedprompt.fl.rounds.serve`` with the adapter's ``MethodServer``),
  returning the run's summary; ``check(cfg, spec) -> dict``, the method's own checks before anything starts
  (models it needs, the service it talks to), returning facts to record in the run folder.

``privacy`` lists the mechanisms (``privacy.name``, see ``fedprompt.schema.PRIVACY``) the method implements.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Literal, overload

from fedprompt.errors import ConfigError

# What the launcher and the apps ask a method for -> the attribute of its adapter module.
ADAPTER_PARTS = {"client": "train", "server": "run_server", "checks": "check"}


@dataclass(frozen=True)
class FederatedMethod:
    name: str
    config: str
    adapter: str
    privacy: tuple[str, ...] = ("none",)

    @overload
    def load(self, part: Literal["config"]) -> type[Any]: ...
    @overload
    def load(self, part: str) -> Callable[..., Any]: ...

    def load(self, part: str) -> Callable[..., Any]:
        """``"config"`` (the config class) or one of :data:`ADAPTER_PARTS` (the adapter's callable)."""
        if part == "config":
            module, _, attribute = self.config.partition(":")
        else:
            module, attribute = self.adapter, ADAPTER_PARTS[part]
        return getattr(import_module(module), attribute)


METHODS: dict[str, FederatedMethod] = {
    "feddtpt": FederatedMethod("feddtpt", config="fedprompt.methods.feddtpt:FedDTPTConfig", adapter="fedprompt.fl.feddtpt"),
    "post": FederatedMethod("post", config="fedprompt.methods.post:POSTConfig", adapter="fedprompt.fl.post"),
    "rapt": FederatedMethod("rapt", config="fedprompt.methods.rapt:RAPTConfig", adapter="fedprompt.fl.rapt"),
    "bbt": FederatedMethod("bbt", config="fedprompt.methods.bbt:BBTConfig", adapter="fedprompt.fl.bbt"),
    "bdpl": FederatedMethod("bdpl", config="fedprompt.methods.bdpl:BDPLConfig", adapter="fedprompt.fl.bdpl"),
}


def federated_method(name: Any) -> FederatedMethod:
    if name not in METHODS:
        raise ConfigError(f"fedprompt run supports method={' | '.join(METHODS)}, got {name!r}")
    return METHODS[str(name)]
