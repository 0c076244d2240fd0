"""One client's local black-box tuning: CMA-ES over z against a soft-prompt black box (BBT, Sun et al. 2022).

Each iteration CMA-ES proposes ``popsize`` candidates z; each is turned into a soft prompt P0 + A z
(:class:`~fedprompt.methods.bbt.projection.RandomProjection`) and scored by the black box on the same
batch of local examples (drawn per iteration from a seeded generator: candidates of one iteration are
ranked on equal terms). The loss of a candidate is the mean cross-entropy of the gold label under the
label log-probs renormalised over the task's labels (BBT's loss). CMA-ES is told the losses and updates
its mean, step size and covariance. The client keeps the best (lowest-loss) z it evaluated.

Every query is counted: ``queries`` is the number of texts scored (batch size x candidates), and
``usage`` the black box's own accounting of the same calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from fedprompt.blackbox.base import ClassifyResult, Usage
from fedprompt.methods.bbt.config import BBTConfig
from fedprompt.methods.bbt.projection import RandomProjection


class EmbedsScorer(Protocol):
    """What the search needs of a black box: label log-probs for texts under a continuous prompt."""

    def classify_embeds(self, texts: Sequence[str], labels: Sequence[str], soft_prompt: np.ndarray) -> ClassifyResult:
        ...


def label_cross_entropy(logprobs: np.ndarray, gold: Sequence[int]) -> float:
    """Mean -log p(gold | text) with p the label log-probs renormalised over the labels (a softmax over C)."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    normalised = logprobs - np.logaddexp.reduce(logprobs, axis=1, keepdims=True)
    return float(-normalised[np.arange(len(gold)), np.asarray(gold)].mean())


@dataclass
class SearchResult:
    best_z: np.ndarray  # the lowest-loss candidate evaluated (on its own iteration's batch)
    best_loss: float
    mean: np.ndarray  # CMA-ES's final mean (the distribution's centre)
    sigma: float  # CMA-ES's final step size
    iterations: int
    evaluations: int  # candidates scored
    queries: int  # texts scored by the black box
    losses: list[float] = field(default_factory=list)  # mean candidate loss per iteration
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


class LocalCMA:
    """CMA-ES on z for one client; plain numpy + ``cma``, no Flower."""

    def __init__(self, config: BBTConfig, projection: RandomProjection) -> None:
        if projection.intrinsic_dim != config.intrinsic_dim:
            raise ValueError(f"projection has d={projection.intrinsic_dim}, config intrinsic_dim={config.intrinsic_dim}")
        self.config, self.projection = config, projection

    def run(self, blackbox: EmbedsScorer, texts: Sequence[str], gold: Sequence[int], labels: Sequence[str],
            mean: np.ndarray, sigma: float, seed: int) -> SearchResult:
        """``local_iterations`` CMA-ES iterations from N(mean, sigma^2 I) on ``texts`` with labels ``gold``."""
        import cma

        cfg = self.config
        if len(texts) != len(gold) or not texts:
            raise ValueError(f"need as many gold labels as texts (and at least one), got {len(texts)} and {len(gold)}")
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"the CMA-ES step size must be a positive number, got {sigma}")
        start = time.perf_counter()
        x0 = np.asarray(mean, dtype=np.float64)
        options: dict[str, Any] = {"popsize": cfg.popsize, "seed": _cma_seed(seed), "verbose": -9, "CMA_diagonal": False}
        if cfg.bound is not None:
            options["bounds"] = [-cfg.bound, cfg.bound]
            x0 = np.clip(x0, -cfg.bound, cfg.bound)  # an average of bounded points is inside; guard rounding
        es = cma.CMAEvolutionStrategy(x0, float(sigma), options)
        rng = np.random.default_rng(seed)
        gold_arr = np.asarray(gold)
        best_z, best_loss = x0.copy(), float("inf")
        losses, usage, queries, evaluations, iterations = [], Usage(), 0, 0, 0
        for _ in range(cfg.local_iterations):
            batch = _batch(rng, len(texts), cfg.batch_size)
            batch_texts, batch_gold = [texts[i] for i in batch], gold_arr[batch]
            candidates = es.ask()
            fitness = []
            for z in candidates:
                result = blackbox.classify_embeds(batch_texts, labels, self.projection.prompt(z))
                assert result.logprobs is not None  # classify_embeds always returns log-probs
                loss = label_cross_entropy(result.logprobs, batch_gold)
                fitness.append(loss)
                usage.add(result.usage)
                queries += len(batch_texts)
                evaluations += 1
                if loss < best_loss:
                    best_z, best_loss = np.asarray(z, dtype=np.float64).copy(), loss
            es.tell(candidates, fitness)
            losses.append(float(np.mean(fitness)))
            iterations += 1
            if es.stop():  # converged (e.g. a flat landscape): further queries would be wasted
                break
        # xfavorite: the mean mapped into the bounds (es.mean is CMA's internal, unbounded coordinate).
        return SearchResult(best_z.astype(np.float32), best_loss, np.asarray(es.result.xfavorite, dtype=np.float32),
                            float(es.sigma), iterations, evaluations, queries, losses, usage,
                            time.perf_counter() - start)


def _batch(rng: np.random.Generator, n: int, size: int | None) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def _cma_seed(seed: int) -> int:
    # cma reads a seed of 0 (or None) as "seed from the clock": keep it positive so that runs repeat.
    return int(seed) % (2**31 - 2) + 1
