"""Calibration of label scores, estimated on a few training examples and applied when scoring (``task.calibration``).

A small LM often prefers one label word whatever the input: with the fallback prompt (conf/task/custom.yaml)
SmolLM2 called every review of a new sentiment task " negative" (0.381 on test, majority class 0.622). Mean
calibration (Zhao et al. 2021, "Calibrate before use", with real inputs in place of the content-free one)
measures that preference and divides it out:

    bias_c = log( mean over the calibration examples of p(label c | example) )
    calibrated score_c = log p(label c | input) - bias_c

The calibration examples are ``task.calibration_examples`` rows of the **train** split (a seeded draw, as
evenly spread over the classes as train allows), formatted with the same prompt as the scored inputs. Their
labels serve only to weight each class equally in the mean, so the bias measures the model's preference and
not the split's class balance. Nothing of the evaluated split is used (unlike ``calibrate=true``, which also
reports mean calibration over the evaluated inputs themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedprompt.data.sampling import sample_balanced
from fedprompt.data.task import Example
from fedprompt.errors import ConfigError

METHODS = ("none", "mean")
DEFAULT_EXAMPLES = 64


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "none"
    examples: int = DEFAULT_EXAMPLES

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @classmethod
    def from_task(cls, task_cfg: Mapping[str, Any]) -> CalibrationSettings:
        """``task.calibration`` / ``task.calibration_examples``, checked (a config without them: none)."""
        method = str(task_cfg.get("calibration") or "none")
        if method not in METHODS:
            raise ConfigError(f"task.calibration={method!r} is not one of {list(METHODS)}")
        examples = task_cfg.get("calibration_examples")
        examples = DEFAULT_EXAMPLES if examples is None else int(examples)
        if method != "none" and examples < 2:
            raise ConfigError(f"task.calibration_examples must be >= 2 with task.calibration={method}, got {examples}")
        return cls(method=method, examples=examples)


def calibration_examples(train: Sequence[Example], settings: CalibrationSettings, num_labels: int,
                         seed: int) -> list[Example]:
    """The training rows the bias is measured on (empty when calibration is off)."""
    if not settings.enabled:
        return []
    return sample_balanced(train, min(settings.examples, len(train)), num_labels, seed)


def normalize(log_scores: np.ndarray) -> np.ndarray:
    """Log-probabilities renormalised over the label words."""
    return log_scores - np.logaddexp.reduce(log_scores, axis=1, keepdims=True)


def mean_bias(log_scores: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``(C,)`` log of each label's mean probability over the rows, every present class weighing the same."""
    logp = normalize(np.asarray(log_scores, dtype=np.float64))
    label_arr = np.asarray(labels)
    per_class = [np.exp(logp[label_arr == c]).mean(axis=0) for c in np.unique(label_arr)]
    return np.log(np.clip(np.mean(per_class, axis=0), 1e-12, None)).astype(np.float32)


def apply_bias(log_scores: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Calibrated scores (unchanged when ``bias`` is None)."""
    if bias is None:
        return log_scores
    return (normalize(np.asarray(log_scores, dtype=np.float64)) - bias).astype(np.float32)


def estimate_bias(score: Callable[[Sequence[Example]], np.ndarray], examples: Sequence[Example]) -> np.ndarray | None:
    """The bias of the scorer ``score`` (examples -> (N, C) log scores) on ``examples`` (None without any)."""
    if not examples:
        return None
    return mean_bias(score(examples), [e.label for e in examples])


def majority_rate(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent class of ``labels`` (the floor a prompt should clear)."""
    label_arr = np.asarray(labels)
    return float(np.bincount(label_arr).max() / len(label_arr)) if len(label_arr) else 0.0
