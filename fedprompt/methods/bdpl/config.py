"""BDPL / FedOne configuration (``conf/method/bdpl.yaml``): one flat, frozen, validated node.

:meth:`BDPLConfig.from_dict` runs before any model is loaded or any query is sent; unknown keys are
errors (a typo in a sweep must not fall back to a default silently), and every bad value says how to
fix it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from fedprompt.errors import ConfigError

OPTIMIZERS = ("adam", "sgd")
OPTIMIZER_STATES = ("reset", "keep")


@dataclass(frozen=True)
class BDPLConfig:
    """The whole ``method`` node of ``method=bdpl`` (BDPL on every activated client; FedOne with one).

    - ``prompt_length``: L, the discrete prompt's slots;
    - ``candidates``: V, the candidate tokens of every slot (the V most frequent whole-word tokens of
      ``vocab_model``'s tokenizer, at least ``min_word_len`` letters);
    - ``samples_per_step``: I, prompts sampled per step (>= 2: the baseline leaves one out);
    - ``local_steps``, ``batch_size``, ``lr``, ``optimizer``: the client's local policy-gradient steps;
    - ``optimizer_state``: ``reset`` (a fresh optimizer every round) or ``keep`` (the client's Adam
      moments carried across its rounds in ``context.state``);
    - ``clients_per_round``: K clients activated per round (1 = FedOne);
    - ``query_budget``: at most this many black-box queries per client per round (null = no cap).
    - ``vocab_model``: tokenizer of the candidates (null = model.name, the service model: its own words read back as
      the same tokens)
    """

    name: str = "bdpl"
    prompt_length: int = 10
    candidates: int = 200
    min_word_len: int = 2  # shortest candidate word (drops single letters)
    vocab_model: str | None = None
    samples_per_step: int = 4
    local_steps: int = 8
    batch_size: int = 16  # examples per step (all of them if the client has fewer); a step costs samples_per_step x batch_size queries
    lr: float = 0.1  # step size on the logits (Adam: about the change per step; 0.1 x ~50 steps can make a slot near-deterministic)
    optimizer: str = "adam"  # adam (BDPL's choice) | sgd
    optimizer_state: str = "reset"
    clients_per_round: int = 1
    query_budget: int | None = None

    @classmethod
    def from_dict(cls, node: Mapping[str, Any] | None = None) -> BDPLConfig:
        """Build and validate from a ``method`` config node (fedprompt.typed_config.from_node)."""
        from fedprompt.typed_config import from_node

        return from_node(cls, node, "method")

    def validate(self) -> None:
        if self.name != "bdpl":
            raise ConfigError(f"method.name is {self.name!r}; this config is for 'bdpl'")
        for key in ("prompt_length", "candidates", "min_word_len", "local_steps", "batch_size", "clients_per_round"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if self.candidates < 2:
            raise ConfigError(f"method.candidates must be >= 2 (one token per slot leaves nothing to learn), "
                              f"got {self.candidates}")
        if self.samples_per_step < 2:
            raise ConfigError(f"method.samples_per_step must be >= 2: the variance-reduced gradient divides by "
                              f"samples_per_step - 1 (BDPL's leave-one-out baseline), got {self.samples_per_step}")
        if not self.lr > 0:
            raise ConfigError(f"method.lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"method.optimizer={self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(f"method.optimizer_state={self.optimizer_state!r} is not one of {list(OPTIMIZER_STATES)}")
        if self.vocab_model is not None and not str(self.vocab_model).strip():
            raise ConfigError("method.vocab_model is empty; use null (the service model, model.name) or a model name")
        step = self.samples_per_step * self.batch_size
        if self.query_budget is not None and self.query_budget < step:
            raise ConfigError(f"method.query_budget={self.query_budget} cannot pay for one step "
                              f"(samples_per_step x batch_size = {step} queries); raise it to >= {step}, "
                              "shrink the batch or set it to null")

    @property
    def queries_per_step(self) -> int:
        """Queries of one local step on a full batch: every sampled prompt on every batch example."""
        return self.samples_per_step * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
