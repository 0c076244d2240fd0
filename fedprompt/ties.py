"""Exact ties between label scores, broken by a rule that favours no label.

``np.argmax`` gives a tie to the first label, so every tied row is a vote for label 0 (11 of 300 SST-2
rows with SmolLM2 in bf16 before scores were computed in float32). :func:`pick_labels` breaks a tie by the
row's input text instead; it is numpy-only so that every client (in-process, ``fedprompt serve``, the
OpenAI-compatible one) and ``fedprompt eval`` apply the same rule.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def tie_key(text: str) -> int:
    """A stable 64-bit hash of ``text`` (BLAKE2b of its UTF-8; Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def pick_labels(scores: np.ndarray, keys: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
    """Per row the index of the best score, and the number of rows whose best score is shared (ties).

    Rule for an exact tie: among the tied labels (in label order), take the one at position
    ``tie_key(keys[i]) % (number tied)``, ``keys[i]`` being the row's input text (the formatted example;
    the row number when no keys are given). Deterministic (same text, same choice, in every process and
    client, whatever the batch), and spread over the tied labels across examples instead of always the
    first one (``np.argmax``'s silent bias). A row of NaNs gets ``np.argmax``'s answer.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] == 0:
        return np.zeros(scores.shape[:1], dtype=np.int64), 0
    predictions = scores.argmax(axis=1)
    best = scores.max(axis=1, keepdims=True)
    tied = np.flatnonzero((scores == best).sum(axis=1) > 1)
    for i in tied:
        candidates = np.flatnonzero(scores[i] == best[i])
        key = keys[int(i)] if keys is not None else str(i)
        predictions[i] = candidates[tie_key(key) % len(candidates)]
    return predictions, int(len(tied))
