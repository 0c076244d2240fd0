"""Manual-prompt and zero-shot evaluation: no training, one pass over a split."""

from __future__ import annotations

from typing import Sequence

from fedprompt.data.task import Example
from fedprompt.models.classifier import EvalResult, PromptedClassifier


def evaluate_prompt(
    classifier: PromptedClassifier,
    examples: Sequence[Example],
    prompt: str | None = None,
    calibrate: bool = False,
    show_progress: bool = True,
    bias=None,
) -> EvalResult:
    """Accuracy of ``prompt`` (None: the task's manual prompt; "": zero-shot) on ``examples``; ``bias``: the
    task's calibration (fedprompt.models.calibration), None for raw scores."""
    if not show_progress:
        return classifier.evaluate(examples, prompt, calibrate, bias=bias)
    from tqdm.auto import tqdm

    with tqdm(total=len(examples), desc=f"eval {classifier.spec.name}", unit="ex", dynamic_ncols=True) as bar:
        return classifier.evaluate(examples, prompt, calibrate, progress=bar.update, bias=bias)
