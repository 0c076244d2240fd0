"""Scoring a text prompt through a black box: the predicted class per example, and the accuracy.

What the discrete-prompt methods' servers score with (the global prompt every round, the untuned references,
FedDTPT's public-pool check). Plain Python: any :class:`~fedprompt.blackbox.BlackBoxLM` with ``classify``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedprompt.data import Example, TaskSpec


def predict_prompt(blackbox, spec: TaskSpec, examples: Sequence[Example], prompt: Sequence[str] | str | None) -> np.ndarray:
    """A black box's predicted class per example under a text ``prompt`` (None: the manual prompt, "": zero-shot;
    a list of words is joined with spaces): what the discrete-prompt methods' servers score with."""
    text = prompt if prompt is None or isinstance(prompt, str) else " ".join(prompt)
    result = blackbox.classify([spec.format(e, text) for e in examples], list(spec.label_words), labels_only=True)
    return np.asarray(result.predictions)


def score_prompt(blackbox, spec: TaskSpec, examples: Sequence[Example],
                 prompt: Sequence[str] | str | None) -> tuple[float, int]:
    """Accuracy of ``prompt`` (None: the manual prompt) from the black box's predicted labels; and the queries."""
    predictions = predict_prompt(blackbox, spec, examples, prompt)
    return float(np.mean(predictions == np.array([e.label for e in examples]))), len(examples)


def check_service(cfg, spec: TaskSpec) -> None:
    """Before launch, for a method that scores text prompts through ``service.kind``: an http service must answer
    now (not after Ray has started); an in-process one has the task's label words encoded once here, which also
    converts an embedded model once, so that the clients do not all convert it at the same time."""
    if cfg.service.kind == "http":
        from fedprompt.blackbox import make_blackbox

        with make_blackbox(cfg, retries=0) as service:
            service.health()
    if cfg.service.kind == "inprocess":
        from fedprompt.models.registry import load_tokenizer
        from fedprompt.models.scoring import encode_label_words

        encode_label_words(load_tokenizer(str(cfg.model.name)), spec.label_words)
