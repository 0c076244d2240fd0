"""The statistics ``fedprompt report`` prints: a mean over seeds with its 95% interval, and the paired
bootstrap of a gain over examples (docs/experiments.md, "Statistics").

- ``seed_interval``: Student-t interval of the mean of per-seed values (n - 1 degrees of freedom). With one
  seed there is no interval: it is ``None``, never a zero-width one.
- ``paired_bootstrap``: ``correct`` and ``reference`` are (seeds, examples) 0/1 arrays, every seed scored
  on the same examples. The statistic is the gain averaged over seeds,
  ``mean_s mean_i (correct[s, i] - reference[s, i])``. Each replicate draws the examples with replacement
  (one draw shared by all seeds: the pairing over examples and seeds is kept) and recomputes the statistic
  on them. The CI is the replicates' 2.5 and 97.5 percentiles; the two-sided p-value is
  ``min(1, 2 * min(P*(gain <= 0), P*(gain >= 0)))`` with the add-one correction
  ``(1 + #replicates on that side) / (1 + B)``, so it is never 0. The interval covers the
  example-sampling uncertainty of the seeds' average; the spread between seeds is in ``seed_interval``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    ci95: tuple[float, float] | None  # None: undefined (one value)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": None if self.ci95 is None else list(self.ci95)}


@dataclass(frozen=True)
class Gain(Interval):
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "p_value": self.p_value}


def seed_interval(values) -> Interval:
    """Mean of per-seed values and its Student-t 95% interval (None for a single value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarise")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, None)
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return Interval(mean, (mean - half, mean + half))


def paired_bootstrap(correct, reference, replicates: int = 10_000, seed: int = 0, chunk: int = 500) -> Gain:
    """Gain of ``correct`` over ``reference`` ((seeds, examples) 0/1 arrays): mean, 95% CI and two-sided p."""
    a, b = np.atleast_2d(np.asarray(correct, dtype=float)), np.atleast_2d(np.asarray(reference, dtype=float))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"paired arrays must share one non-empty (seeds, examples) shape, got {a.shape} and {b.shape}")
    diff = (a - b).mean(axis=0)  # per example, averaged over seeds: resampling examples keeps the pairing
    n = diff.size
    rng = np.random.default_rng(seed)
    stats = np.empty(replicates)
    for start in range(0, replicates, chunk):  # (chunk, n) index draws at a time: bounded memory
        size = min(chunk, replicates - start)
        stats[start:start + size] = diff[rng.integers(0, n, size=(size, n))].mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    below, above = (1 + np.sum(stats <= 0)) / (1 + replicates), (1 + np.sum(stats >= 0)) / (1 + replicates)
    return Gain(float(diff.mean()), (float(low), float(high)), float(min(1.0, 2 * min(below, above))))
