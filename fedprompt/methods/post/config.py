"""POST's configuration: the federated tuning (``method``, conf/method/post.yaml) and the transfer
(``transfer``, conf/transfer/default.yaml). Typed and strict: unknown keys and bad values are errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedprompt.errors import ConfigError
from fedprompt.privacy.settings import PrivacyConfig
from fedprompt.typed_config import from_node

# The public transfer set of a task when transfer.public_task is null: a related public task's train
# text (POST's setting), else the tuned task's own validation text (never its train split: the clients').
# The tuned task's own validation text by default. SST-2 and MR are one corpus (Rotten Tomatoes): MR's train
# split holds 651 of SST-2's 1,821 test sentences (and SST-2's splits hold MR's), so neither is public text
# for the other: the content check of `fedprompt transfer` refuses it.
DEFAULT_PUBLIC_TASK: dict[str, str] = {}
INITS = ("text", "student")
OPTIMIZERS = ("adam", "sgd")
LOGITS = ("vocab", "labels")


@dataclass
class PromptConfig:
    """The soft prompt (``method.prompt``): POST's ~100 tokens, initialised from text."""

    num_tokens: int = 100  # POST: ~100 prompt vectors
    init_text: str | None = None  # null: the task's manual prompt (its tokens repeated to num_tokens)

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"method.prompt.num_tokens must be >= 1, got {self.num_tokens}")
        if self.init_text is not None and not self.init_text.strip():
            raise ConfigError("method.prompt.init_text is empty; give some text or null (the task's manual prompt)")


@dataclass
class TrainConfig:
    """Local training (``method.train``): one call of the tuner = ``local_steps`` optimizer steps."""

    local_steps: int = 8  # optimizer steps per client per round
    batch_size: int = 16  # with DP: the expected size of a Poisson batch (rate batch_size / N)
    lr: float = 0.03
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.0  # sgd only

    def validate(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"method.train.local_steps must be >= 1, got {self.local_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"method.train.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"method.train.lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"method.train.optimizer={self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"method.train.momentum must be in [0, 1), got {self.momentum}")


def check_logits(logits: str) -> None:
    if logits not in LOGITS:
        raise ConfigError(f"transfer.logits={logits!r} is not one of {list(LOGITS)} (vocab: all next-token logits "
                          "at the answer position, POST's; labels: the label words' only, an ablation)")


@dataclass
class POSTConfig:
    """The ``method`` node of ``fedprompt run method=post``: soft-prompt tuning on each client, FedAvg."""

    name: str = "post"
    model: str = "student"  # the model tuned on: "student" (fedprompt distill's default output) or any model reference
    device: str = "auto"  # where the clients (and the server's evaluation) run the tuned-on model
    dtype: str = "auto"  # auto = bf16 (the prompt itself is fp32)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @classmethod
    def from_dict(cls, node: Any = None) -> POSTConfig:
        return from_node(cls, node, "method")

    def validate(self) -> None:
        if self.name != "post":
            raise ConfigError(f"method.name is {self.name!r}; this config is for 'post'")
        if not self.model:
            raise ConfigError("method.model is empty; use 'student' or a model name / folder / HF id")
        self.prompt.validate()
        self.train.validate()
        self.privacy.validate()


@dataclass
class TransferConfig:
    """The ``transfer`` node of ``fedprompt transfer``: POST's prompt transfer to the large model (``model``).

    - ``logits``: vocab = both KL terms over all next-token logits at the answer position (POST's) | labels = the
      label words' logits only (ablation)
    """

    prompt: str | None = None  # the student's soft prompt file (a method=post run folder's prompt.safetensors)
    student: str = "student"  # the model the prompt was tuned on
    public_task: str | None = None  # null: the tuned task itself (DEFAULT_PUBLIC_TASK may map it to another)
    public_split: str | None = None  # null: validation of the tuned task, train of another task
    public_size: int = 256  # public examples (seeded sample)
    steps: int = 16  # fixed number of steps; the last step's prompt is the result (no selection on validation)
    batch_size: int = 16
    lr: float = 0.01
    temperature: float = 2.0
    # vocab: both KL terms over all next-token logits at the answer position (POST's) | labels: label words (ablation)
    logits: str = "vocab"
    alpha: float | None = None  # null: POST's rule from ZS and C on alpha_split
    alpha_split: str = "validation"  # labelled public split of the tuned task for ZS (large, no soft prompt) and C (student + prompt)
    alpha_limit: int = 200
    init: str = "text"  # text: the task's text init (as the student's prompt began) | student: the student's prompt

    @classmethod
    def from_dict(cls, node: Any = None) -> TransferConfig:
        return from_node(cls, node, "transfer")

    def validate(self) -> None:
        for key in ("public_size", "steps", "batch_size", "alpha_limit"):
            if getattr(self, key) < 1:
                raise ConfigError(f"transfer.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ConfigError(f"transfer.lr and transfer.temperature must be > 0, got {self.lr}, {self.temperature}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ConfigError(f"transfer.alpha must be in [0, 1] (or null for POST's rule), got {self.alpha}")
        if self.init not in INITS:
            raise ConfigError(f"transfer.init={self.init!r} is not one of {list(INITS)}")
        check_logits(self.logits)

    def public_source(self, task: str) -> tuple[str, str]:
        """(task, split) of the public transfer set for the tuned ``task``."""
        public = self.public_task or DEFAULT_PUBLIC_TASK.get(task, task)
        split = self.public_split or ("validation" if public == task else "train")
        if public == task and split == "train":
            raise ConfigError(f"transfer.public_split=train of the tuned task {task!r} is the clients' private data; "
                              "use its validation split or another task's text (transfer.public_task)")
        return public, split
