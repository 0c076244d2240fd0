"""Seeded sampling: k-shot training sets and small class-balanced batches."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from fedprompt.data.task import Example
from fedprompt.errors import DataError


def label_histogram(examples: Sequence[Example], num_labels: int) -> list[int]:
    counts = Counter(e.label for e in examples)
    return [counts.get(c, 0) for c in range(num_labels)]


def sample_k_shot(examples: Sequence[Example], k: int, num_labels: int, seed: int = 0) -> list[Example]:
    """``k`` examples of every class, drawn without replacement with ``seed``; order shuffled."""
    if k < 1:
        raise DataError(f"k must be >= 1 examples per class, got {k}")
    hist = label_histogram(examples, num_labels)
    short = {c: n for c, n in enumerate(hist) if n < k}
    if short:
        raise DataError(
            f"k={k} per class is larger than what the split holds for classes {short} (class: count); "
            f"lower k to at most {min(hist)}"
        )
    rng = np.random.default_rng(seed)
    by_class = [[i for i, e in enumerate(examples) if e.label == c] for c in range(num_labels)]
    chosen = np.concatenate([rng.choice(idx, size=k, replace=False) for idx in by_class])
    rng.shuffle(chosen)
    return [examples[i] for i in chosen]


def balanced_quotas(hist: Sequence[int], budget: int) -> list[int]:
    """Per-class counts that sum to at most ``budget`` and are as even as ``hist`` allows.

    Classes are filled from the rarest up: a class with fewer examples than its share gives all it has
    and the shortfall goes to the others (TREC's validation split has 2 "abbreviation" questions; cutting
    every class to 2 would shrink a 64-example pool to 12). Equal shares when every class has enough.
    """
    quotas = [0] * len(hist)
    present = sorted((n, c) for c, n in enumerate(hist) if n > 0)
    left = budget
    for i, (n, c) in enumerate(present):
        quotas[c] = min(n, left // (len(present) - i))
        left -= quotas[c]
    return quotas


def sample_balanced(examples: Sequence[Example], size: int, num_labels: int, seed: int = 0) -> list[Example]:
    """About ``size`` examples, as evenly spread over the classes as the data allows (``balanced_quotas``)."""
    hist = label_histogram(examples, num_labels)
    present = [c for c, n in enumerate(hist) if n > 0]
    quotas = balanced_quotas(hist, max(1, size // num_labels) * len(present))
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [rng.choice([i for i, e in enumerate(examples) if e.label == c], size=quotas[c], replace=False) for c in present]
    )
    rng.shuffle(chosen)
    return [examples[i] for i in chosen]
