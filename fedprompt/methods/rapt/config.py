"""RAPT's configuration (``conf/method/rapt.yaml``), typed and validated strictly before anything loads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fedprompt.errors import ConfigError
from fedprompt.privacy.settings import DChiConfig

PROMPT_INITS = ("manual", "random")


@dataclass(frozen=True)
class ReconstructionConfig:
    """Privatized-token reconstruction: random public plain tokens prepended to every text before
    privatization (fresh for every example, so the head cannot learn them by position), and a head that
    predicts them back from the model's last hidden states."""

    enabled: bool = True  # false: plain prompt tuning on privatized text (no plain tokens, no head)
    plain_tokens: int = 16  # plain tokens per example
    plain_vocab: int = 1000  # drawn from (and reconstructed among) the first N ids of the vocabulary
    weight: float = 1.0  # loss = task + weight * reconstruction
    head_dim: int = 256  # the head: hidden -> head_dim -> hidden, scored against the frozen embedding

    def validate(self) -> None:
        _at_least("reconstruction.plain_tokens", self.plain_tokens, 1)
        _at_least("reconstruction.plain_vocab", self.plain_vocab, self.plain_tokens)
        _at_least("reconstruction.head_dim", self.head_dim, 1)
        if not self.weight > 0:
            raise ConfigError(f"reconstruction.weight must be > 0 (use enabled=false to switch it off), got {self.weight}")


@dataclass(frozen=True)
class PromptConfig:
    num_tokens: int = 10  # soft-prompt vectors prepended to the input embeddings
    init: str = "manual"  # manual: the embeddings of the task's manual prompt, repeated/cut | random

    def validate(self) -> None:
        _at_least("prompt.num_tokens", self.num_tokens, 1)
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt.init={self.init!r} is not one of {list(PROMPT_INITS)}")


@dataclass(frozen=True)
class TrainConfig:
    """The service's training of the prompt (and head) on the privatized examples it received."""

    steps: int = 40  # optimizer steps per round, on all examples received so far
    batch_size: int = 8
    lr: float = 0.01  # soft prompt (AdamW)
    head_lr: float = 0.01  # reconstruction head (AdamW)
    max_text_tokens: int = 64  # a client truncates each text to this many tokens before privatizing it
    eval_batch_size: int = 16

    def validate(self) -> None:
        for key in ("steps", "batch_size", "max_text_tokens", "eval_batch_size"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("lr", "head_lr"):
            if not 0 < getattr(self, key) < 10:
                raise ConfigError(f"train.{key} must be in (0, 10), got {getattr(self, key)}")


@dataclass(frozen=True)
class RAPTConfig:
    """The whole ``method`` node for RAPT."""

    name: str = "rapt"
    privatize: DChiConfig = field(default_factory=lambda: DChiConfig(eta=30.0))
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def plain_tokens(self) -> int:
        """Plain tokens a client prepends (0 without reconstruction: nothing would read them)."""
        return self.reconstruction.plain_tokens if self.reconstruction.enabled else 0

    @classmethod
    def from_dict(cls, node: Mapping[str, Any] | None = None) -> RAPTConfig:
        """Build and validate from a ``method`` config node (fedprompt.typed_config.from_node)."""
        from fedprompt.typed_config import from_node

        return from_node(cls, node, "method")

    def validate(self) -> None:  # the parts validate themselves (fedprompt.typed_config.check_tree)
        if self.name != "rapt":
            raise ConfigError(f"method.name is {self.name!r}; this config is for 'rapt'")
        if not self.privatize.enabled:
            raise ConfigError("method.privatize.eta is null: RAPT privatizes every text; set eta > 0 "
                              "(or .inf for the no-noise reference)")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.privatize.eta is not None and math.isinf(self.privatize.eta):
            out["privatize"]["eta"] = "inf"  # JSON has no infinity
        return out


def _at_least(where: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value}")
