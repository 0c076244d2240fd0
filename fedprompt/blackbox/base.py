"""The black-box LLM interface every method talks to: text in, label scores or labels out.

A caller formats its inputs itself (template + prompt + example) and sends them with the candidate label
strings; the service returns, per input, the log-probability of each candidate continuation, or, in
"labels-only" mode (what FedDTPT assumes a service gives), only the index of the best one. Every call
is accounted: requests, queries (inputs scored), tokens, and bytes on the wire.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Usage:
    """Cumulative cost of calls to a black box (per client, per API key, or per round)."""

    requests: int = 0
    queries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def add(self, other: Usage) -> Usage:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def minus(self, earlier: Usage) -> Usage:
        """The usage accrued since ``earlier`` (a snapshot taken with ``copy``)."""
        return Usage(**{k: v - getattr(earlier, k) for k, v in asdict(self).items()})

    def copy(self) -> Usage:
        return Usage(**asdict(self))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ClassifyResult:
    """Per input: the predicted candidate index and, unless labels-only, all candidates' log-probs."""

    predictions: list[int]
    logprobs: np.ndarray | None = None  # (N, C) float32, None in labels-only mode
    usage: Usage = field(default_factory=Usage)  # the cost of this one call
    # (N, C) bool where a log-prob is only an upper bound (a label outside an OpenAI server's top-k); else None
    floored: np.ndarray | None = None


class BlackBoxLM(abc.ABC):
    """A language model seen only through its predictions. Implementations keep ``usage`` cumulative."""

    def __init__(self) -> None:
        self.usage = Usage()

    @abc.abstractmethod
    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        """Score each candidate string in ``labels`` as the continuation of each text in ``texts``."""

    def close(self) -> None:  # noqa: B027  (optional hook: network clients release connections, others hold none)
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class PromptSpace:
    """What a caller must know to build a continuous prompt for a service: the width of one prompt vector
    and the spread of the model's own token embeddings (BBT scales its random projection by it)."""

    hidden_size: int
    embedding_std: float


class SoftPromptBlackBox(BlackBoxLM):
    """A black box that also accepts a continuous prompt: (P, H) vectors prepended to every input's token
    embeddings (Black-Box Tuning, Sun et al. 2022: "language-model-as-a-service" with prompt embeddings in).

    The caller still sees only label log-probs; ``classify_embeds`` is accounted like ``classify`` (one
    query per text; the prompt's P positions count as prompt tokens of every row the model reads).
    """

    @abc.abstractmethod
    def classify_embeds(self, texts: Sequence[str], labels: Sequence[str], soft_prompt: np.ndarray) -> ClassifyResult:
        """Score each label as the continuation of ``soft_prompt`` (float (P, H)) + each text."""

    @abc.abstractmethod
    def prompt_space(self) -> PromptSpace:
        """The prompt vectors' width and the token embeddings' standard deviation."""

    @abc.abstractmethod
    def text_prompt(self, text: str, num_tokens: int) -> np.ndarray:
        """(num_tokens, H) float32: the embeddings of ``text``'s tokens, repeated or cut (a text-initialised prompt)."""
