"""Prompted classification: a task's template around each example, scored on its label words."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from fedprompt.data.task import Example, TaskSpec
from fedprompt.models.scoring import calibrate_mean, encode_label_words, score_label_words


@dataclass
class EvalResult:
    accuracy: float
    n: int
    examples_per_s: float
    seconds: float
    calibrated_accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class PromptedClassifier:
    """Classify examples of ``spec`` with a causal LM by comparing label-word log-probabilities."""

    def __init__(self, model, tokenizer, spec: TaskSpec, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.spec, self.batch_size = model, tokenizer, spec, batch_size
        self.label_token_ids = encode_label_words(tokenizer, spec.label_words)  # fail early on bad words

    def inputs(self, examples: Sequence[Example], prompt: str | None = None) -> list[str]:
        return [self.spec.format(e, prompt) for e in examples]

    def log_scores(self, examples: Sequence[Example], prompt: str | None = None, soft_prompt=None, progress=None) -> np.ndarray:
        """(N, C) log p(label word | formatted example)."""
        return score_label_words(
            self.model, self.tokenizer, self.inputs(examples, prompt), self.spec.label_words,
            batch_size=self.batch_size, soft_prompt=soft_prompt, progress=progress,
        )

    def evaluate(
        self, examples: Sequence[Example], prompt: str | None = None, calibrate: bool = False, soft_prompt=None, progress=None
    ) -> EvalResult:
        start = time.perf_counter()
        scores = self.log_scores(examples, prompt, soft_prompt, progress)
        seconds = time.perf_counter() - start
        labels = np.array([e.label for e in examples])
        result = EvalResult(
            accuracy=float((scores.argmax(1) == labels).mean()),
            n=len(examples),
            examples_per_s=len(examples) / max(seconds, 1e-9),
            seconds=seconds,
        )
        if calibrate:
            result.calibrated_accuracy = float((calibrate_mean(scores).argmax(1) == labels).mean())
        return result
