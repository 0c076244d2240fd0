"""The ``method`` node of ``fedprompt run method=bbt`` (conf/method/bbt.yaml): FedAvg-BBT and FedBPT.

Typed and strict: unknown keys and values of the wrong type are ConfigErrors naming the key (and the
known keys), out-of-range values are ConfigErrors saying what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedprompt.errors import ConfigError
from fedprompt.typed_config import from_node

MODES = ("fedavg", "fedbpt")
INITS = ("zeros", "text")
CLIENT_RETURNS = ("best", "mean")


@dataclass(frozen=True)
class BBTConfig:
    """Black-box tuning of a soft prompt P = P0 + A z in a low-dimensional space z (Sun et al. 2022), federated.

    ``mode=fedavg`` (FedAvg-BBT): every client runs CMA-ES from the global z with step size ``sigma0`` and
    returns its best z (``client_return=best``) or its final CMA mean; the server averages z weighted by
    examples. ``mode=fedbpt`` (FedBPT, Sun et al. 2023): clients start from the global mean and global step
    size and return their final mean and step size; the server averages both, weighted by examples.

    - ``mode``: fedavg (FedAvg-BBT: clients return a z, the server averages z by examples) | fedbpt (FedBPT: clients
      return their CMA mean and step size, the server averages both by examples)
    """

    name: str = "bbt"
    mode: str = "fedavg"
    intrinsic_dim: int = 50  # d, the length of z (BBT: 500; smaller by default so that CMA-ES is cheap on CPU)
    prompt_tokens: int = 10  # P, soft-prompt vectors prepended to the input (BBT: 50)
    init: str = "text"  # P0: "text" (embeddings of init_text / the manual prompt) | "zeros"
    init_text: str | None = None  # null: the task's manual prompt
    popsize: int = 20  # CMA-ES candidates per iteration (BBT: 20)
    sigma0: float = 1.0  # CMA-ES initial step size (BBT: 1); also sigma_z in the projection's scale
    local_iterations: int = 5  # CMA-ES iterations per client per round (popsize candidates each)
    batch_size: int | None = 16  # local examples scoring each iteration's candidates (null: all of the client's)
    bound: float | None = None  # |z_i| <= bound in CMA-ES (null: unbounded, BBT's default)
    client_return: str = "best"  # fedavg mode: the client's best evaluated z | its final CMA mean
    projection_std: float | None = None  # std of A's entries; null: BBT's sigma_e / (sqrt(d) * sigma0)
    projection_seed: int | None = None  # seed of A, shared by server and clients; null: the run's seed

    @classmethod
    def from_dict(cls, node: Any = None) -> BBTConfig:
        return from_node(cls, node, "method")

    def validate(self) -> None:
        if self.name != "bbt":
            raise ConfigError(f"method.name is {self.name!r}; this config is for 'bbt'")
        for key, allowed in (("mode", MODES), ("init", INITS), ("client_return", CLIENT_RETURNS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"method.{key}={getattr(self, key)!r} is not one of {list(allowed)}")
        for key in ("intrinsic_dim", "prompt_tokens", "local_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if self.popsize < 2:
            raise ConfigError(f"method.popsize must be >= 2 (CMA-ES ranks candidates), got {self.popsize}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"method.batch_size must be >= 1 (or null for all local examples), got {self.batch_size}")
        if not self.sigma0 > 0:
            raise ConfigError(f"method.sigma0 must be > 0, got {self.sigma0}")
        if self.bound is not None and not self.bound > 0:
            raise ConfigError(f"method.bound must be > 0 (or null for no bound), got {self.bound}")
        if self.projection_std is not None and not self.projection_std > 0:
            raise ConfigError(f"method.projection_std must be > 0 (or null for BBT's rule), got {self.projection_std}")
        if self.init == "text" and self.init_text is not None and not self.init_text.strip():
            raise ConfigError("method.init_text is blank; give some text, or null for the task's manual prompt")

    def evaluations_per_round(self) -> int:
        """Candidate prompts a client scores per round (each on one batch)."""
        return self.local_iterations * self.popsize
