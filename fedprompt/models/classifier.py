"""Prompted classification: a task's template around each example, scored on its label words."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from fedprompt.data.task import Example, TaskSpec
from fedprompt.models.calibration import apply_bias
from fedprompt.models.scoring import calibrate_mean, encode_label_words, score_label_words
from fedprompt.ties import pick_labels


@dataclass
class EvalResult:
    accuracy: float
    n: int
    examples_per_s: float
    seconds: float
    calibrated_accuracy: float | None = None
    ties: int = 0  # rows whose best label score was shared exactly (broken by scoring.pick_labels' rule)
    uncalibrated_accuracy: float | None = None  # with a task.calibration bias: the accuracy without it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_scores(cls, scores: np.ndarray, gold: Sequence[int], inputs: Sequence[str], seconds: float,
                    calibrate: bool = False, bias: np.ndarray | None = None) -> EvalResult:
        """Accuracy of (N, C) label scores against ``gold``; ``inputs`` (the formatted texts) key the tie rule.
        With ``bias`` (task.calibration, fedprompt.models.calibration) the accuracy is of the calibrated
        scores, and the raw scores' is kept as ``uncalibrated_accuracy``."""
        labels = np.asarray(gold)
        predictions, ties = pick_labels(apply_bias(scores, bias), inputs)
        result = cls(accuracy=float((predictions == labels).mean()), n=len(labels),
                     examples_per_s=len(labels) / max(seconds, 1e-9), seconds=seconds, ties=ties)
        if bias is not None:
            result.uncalibrated_accuracy = float((pick_labels(scores, inputs)[0] == labels).mean())
        if calibrate:
            result.calibrated_accuracy = float((pick_labels(calibrate_mean(scores), inputs)[0] == labels).mean())
        return result


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

    def predict(self, examples: Sequence[Example], prompt: str | None = None, soft_prompt=None) -> np.ndarray:
        """The predicted class per example, exact ties broken by the shared rule (fedprompt.ties.pick_labels)."""
        return pick_labels(self.log_scores(examples, prompt, soft_prompt), self.inputs(examples, prompt))[0]

    def evaluate(
        self, examples: Sequence[Example], prompt: str | None = None, calibrate: bool = False, soft_prompt=None, progress=None,
        bias: np.ndarray | None = None,
    ) -> EvalResult:
        inputs = self.inputs(examples, prompt)
        start = time.perf_counter()
        scores = score_label_words(self.model, self.tokenizer, inputs, self.spec.label_words, batch_size=self.batch_size,
                                   soft_prompt=soft_prompt, progress=progress)
        seconds = time.perf_counter() - start
        return EvalResult.from_scores(scores, [e.label for e in examples], inputs, seconds, calibrate, bias)
