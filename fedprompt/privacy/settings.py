"""The privacy mechanisms' config sections, without torch or Opacus: ``privatize`` (d_chi text privatization,
:mod:`fedprompt.privacy.dchi`) and ``method.privacy`` (DP-SGD, :mod:`fedprompt.privacy.dp`). Kept apart so that
composing a config (fedprompt.config.DECLARED) imports none of the mechanisms themselves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator

from fedprompt.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")
NOISE_SEEDS = ("simulation", "secure")


def _infinity(value: Any) -> Any:
    """``eta: inf`` (or ``.inf``, ``Infinity``) written as text, as a JSON record of the config holds it."""
    if isinstance(value, str) and value.strip().lower().lstrip(".+") in ("inf", "infinity"):
        return math.inf
    return value


@dataclass(frozen=True)
class DChiConfig:
    """A ``privatize`` config node. ``eta=None``: privatization off; ``.inf``: on, but without noise."""

    eta: Annotated[float | None, BeforeValidator(_infinity)] = None  # E||noise|| = d/eta; null = off
    embedding: str | None = None  # model whose input embeddings (and tokenizer) are used; None = model.name
    device: str = "auto"  # where the nearest-token search runs
    chunk_size: int = 2048  # tokens per matrix product (memory: chunk_size x vocabulary bf16 scores)
    shortlist: int = 8  # bf16 candidates per token, re-ranked exactly in float32

    @property
    def enabled(self) -> bool:
        return self.eta is not None

    def validate(self) -> None:
        if self.eta is not None and not self.eta > 0:
            raise ConfigError(f"eta must be > 0 (E||noise|| = d/eta: larger eta, less noise), or null (off), got {self.eta}")
        for key in ("chunk_size", "shortlist"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, node: Mapping[str, Any] | None, where: str = "privatize") -> DChiConfig:
        """Build and validate a ``privatize`` node (fedprompt.typed_config.from_node)."""
        from fedprompt.typed_config import from_node

        return from_node(cls, node, where)


@dataclass
class PrivacyConfig:
    """DP-SGD settings of one client (``method.privacy``). ``epsilon: null`` trains without DP."""

    epsilon: float | None = None  # target epsilon after all planned steps; null: no DP
    delta: float | None = None  # null: min(1e-5, 1 / (10 N)), N the client's number of examples
    max_grad_norm: float = 1.0  # C: every per-example gradient is clipped to this L2 norm
    accountant: str = "rdp"  # rdp | prv (Opacus' accountants)
    noise_seed: str = "simulation"  # simulation: seeded, reproducible (the server can replay it) | secure: os.urandom

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None and self.epsilon != float("inf")

    def validate(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"privacy.epsilon must be > 0 (or null / inf for no DP), got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1) (or null for min(1e-5, 1/(10 N))), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant={self.accountant!r} is not one of {list(ACCOUNTANTS)}")
        if self.noise_seed not in NOISE_SEEDS:
            raise ConfigError(f"privacy.noise_seed={self.noise_seed!r} is not one of {list(NOISE_SEEDS)}")
