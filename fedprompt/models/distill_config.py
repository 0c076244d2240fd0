"""``fedprompt distill``'s config section (the ``distill`` node, conf/distill/default.yaml), without torch: composing
a config (fedprompt.config.DECLARED) imports this module, not :mod:`fedprompt.models.distill`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fedprompt.errors import ConfigError


@dataclass
class DistillLossWeights:
    a_ce: float = 5.0  # KL to the teacher's softened next-token distribution
    a_lm: float = 2.0  # next-token cross-entropy on the text
    a_cos: float = 1.0  # 1 - cosine of the last hidden states
    a_answer: float = 0.0  # extra KL at each text's last token: the answer position of a task-formatted text
    temperature: float = 2.0

    def validate(self) -> None:
        weights = (self.a_ce, self.a_lm, self.a_cos, self.a_answer)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(f"distill.loss weights must be >= 0 and not all 0, got {asdict(self)}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.loss.temperature must be > 0, got {self.temperature}")


@dataclass
class DistillDataConfig:
    """Public unlabeled text to distil on: the texts of tasks that are not being tuned (labels unused)."""

    tasks: list[str] = field(default_factory=lambda: ["rte", "trec", "agnews"])  # not mr: SST-2's corpus
    split: str = "train"
    max_texts: int = 4000
    format: str = "task"  # task: as the model sees a prompt of that task (template, chat markup) | raw: the text

    def other_tasks(self, tuned: str) -> list[str]:
        """What to distil on instead when ``tuned`` is among ``tasks``: the others, else the defaults but it."""
        return [t for t in self.tasks if t != tuned] or [t for t in DistillDataConfig().tasks if t != tuned]

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("distill.data.tasks is empty; name the tasks whose text to distil on, e.g. [rte, trec, agnews]")
        if self.max_texts < 1:
            raise ConfigError(f"distill.data.max_texts must be >= 1, got {self.max_texts}")
        if self.format not in ("task", "raw"):
            raise ConfigError(f"distill.data.format={self.format!r} is not one of ['task', 'raw']")


@dataclass
class TeacherCacheConfig:
    """Offline distillation (fedprompt.models.teacher_cache): the teacher's outputs computed once, read at each step."""

    enabled: bool = True  # false: the teacher runs forward beside the student at every step (online)
    top_k: int = 128  # teacher log-probabilities kept per token (plus one tail bucket); the vocabulary: exact KL
    hidden_dtype: str = "float16"  # the cached last hidden states (only when loss.a_cos > 0): float16 | float32
    batch_size: int | None = None  # texts per teacher forward while building; null: distill.batch_size
    dir: str | None = None  # null: <student folder>.teacher_cache (one sub-folder per setting's hash)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"distill.teacher_cache.top_k must be >= 1 (the teacher's ids kept per token), got {self.top_k}")
        if self.hidden_dtype not in ("float16", "float32"):
            raise ConfigError(f"distill.teacher_cache.hidden_dtype={self.hidden_dtype!r} is not one of ['float16', 'float32']")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"distill.teacher_cache.batch_size must be >= 1 or null, got {self.batch_size}")


@dataclass
class DistillConfig:
    """``fedprompt distill`` (the ``distill`` config node); the teacher is ``model``.

    - ``train_embeddings``: keep the large model's embeddings and (tied) LM head: the student's prompt stays in the
      large model's space
    """

    layers: list[int] | None = None  # teacher layers kept, in order; null: the first 2 and the last 2
    steps: int = 150
    batch_size: int = 8
    max_length: int = 96  # longer texts are left out (a cut prompt loses its answer position)
    lr: float = 6e-4
    train_embeddings: bool = False
    autocast: bool | None = None  # bf16 autocast for the student's matmuls (fp32 weights and optimizer state); null: where bf16 is fast
    loss: DistillLossWeights = field(default_factory=DistillLossWeights)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    output: str | None = None  # student folder; null: <cache>/students/<teacher> (what method.model=student loads)
    eval_limit: int = 300  # zero-shot accuracy of teacher and student on this many examples of task/split
    seed: int = 0
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    # A rerun with the same settings resumes from the checkpoint; one with other settings is refused.
    checkpoint_every: int = 50  # student, optimizer, step and RNG every N steps into <output>/distill_checkpoint; 0: never
    # The LM head, the largest matmul of a cached step, runs at the drawn positions only; the loss is an unbiased
    # estimate of the all-positions loss, noisier per step.
    loss_positions: float = 1.0  # fraction of positions the KL and LM terms read, drawn per step (last tokens always); 1: all

    def validate(self) -> None:
        for key in ("steps", "batch_size", "max_length", "eval_limit"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distill.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.loss_positions <= 1:
            raise ConfigError(f"distill.loss_positions must be in (0, 1] (the fraction of positions the loss reads), "
                              f"got {self.loss_positions}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"distill.checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        self.teacher_cache.validate()
        if not self.lr > 0:
            raise ConfigError(f"distill.lr must be > 0, got {self.lr}")
        self.data.validate()
        self.loss.validate()
        if self.loss.a_answer and self.data.format != "task":
            raise ConfigError("distill.loss.a_answer weighs the answer position of task-formatted text; with "
                              f"distill.data.format={self.data.format!r} there is none: set format=task or a_answer=0")
