"""Likelihood-ratio membership inference (LiRA; Carlini et al., "Membership Inference Attacks From First
Principles", 2022), the attack POST reports against its prompts.

Setting. A pool of N examples (one client's data). Each of S shadow prompts is trained, with the target's
recipe, on a random half of the pool: :func:`balanced_halves` puts every example in exactly half of the
shadows (Carlini et al.'s design), so each example has S/2 "in" and S/2 "out" models. For every shadow and
every pool example the attacker reads the model's confidence in the true label, logit-scaled
(:func:`logit_confidence`): phi = log p_y - log(1 - p_y), which is close to Gaussian across training runs.

Online test, leave-one-out. Each shadow in turn plays the target; the other S - 1 are the attacker's
shadows. For example x with phi_t(x) under the target,

    score(x) = log N(phi_t(x); mu_in(x), sigma_in^2) - log N(phi_t(x); mu_out(x), sigma_out^2)

with mu_in / mu_out the mean of phi(x) over the other shadows that did / did not train on x. With few shadows a
per-example variance is noisy, so by default sigma_in and sigma_out are *global* (pooled over examples; the
paper's "fixed variance" variant, which it recommends below 64 shadows); ``fixed_variance=False`` uses
per-example ones. A higher score says "member". Over all (target, example) pairs the attack's ROC gives
AUC and TPR at 1% FPR; :func:`auc_interval` bootstraps the AUC over examples (a pool example's S pairs
move together, so examples, not pairs, are the unit).

Several pools. One client's pool of a few dozen examples gives a wide interval; :func:`evaluate_pools` runs the
test within each of several independent pools (each with its own shadows) and puts all their (target, example)
pairs into one ROC. A LiRA score is a log-likelihood ratio calibrated by its own pool's shadows, so scores from
pools trained with the same recipe are on one scale. Its bootstrap resamples examples within each pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from fedprompt.errors import ConfigError


def balanced_halves(num_shadows: int, num_examples: int, seed: int) -> np.ndarray:
    """``(S, N)`` bool: shadow s trains on example n. Every example is in exactly S/2 shadows (S even, >= 4)."""
    if num_shadows < 4 or num_shadows % 2:
        raise ConfigError(f"LiRA needs an even number of shadows >= 4 (each example in half of them), got {num_shadows}")
    if num_examples < 2:
        raise ConfigError(f"LiRA needs a pool of at least 2 examples, got {num_examples}")
    rng = np.random.default_rng(seed)
    ranks = rng.random((num_shadows, num_examples)).argsort(axis=0)  # a random order of the shadows per example
    return ranks < num_shadows // 2


def logit_confidence(label_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) from ``(N, C)`` label logits, computed stably as z_y - logsumexp(z_{j != y})."""
    logits = np.asarray(label_logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ConfigError(f"label logits must be (examples, classes) with one label per row; got {logits.shape} "
                          f"and {labels.shape[0]} labels")
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return true - logsumexp(others, axis=1)


def online_scores(phi: np.ndarray, members: np.ndarray, fixed_variance: bool = True) -> np.ndarray:
    """``(S, N)`` LiRA scores, shadow s as the target against the other shadows; NaN where x had no in or no
    out shadow among the others (cannot happen with :func:`balanced_halves` and S >= 4)."""
    phi = np.asarray(phi, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    if phi.shape != members.shape or phi.ndim != 2:
        raise ConfigError(f"confidences {phi.shape} and membership {members.shape} must both be (shadows, examples)")
    scores = np.full(phi.shape, np.nan)
    for target in range(phi.shape[0]):
        others = np.arange(phi.shape[0]) != target
        p, m = phi[others], members[others]
        n_in, n_out = m.sum(0), (~m).sum(0)
        ok = (n_in > 0) & (n_out > 0)
        mu_in = np.where(m, p, 0).sum(0) / np.maximum(n_in, 1)
        mu_out = np.where(~m, p, 0).sum(0) / np.maximum(n_out, 1)
        dev_in, dev_out = np.where(m, p - mu_in, np.nan), np.where(~m, p - mu_out, np.nan)
        if fixed_variance:
            sd_in = np.full(phi.shape[1], np.sqrt(np.nanmean(dev_in[:, ok] ** 2)))
            sd_out = np.full(phi.shape[1], np.sqrt(np.nanmean(dev_out[:, ok] ** 2)))
        else:
            sd_in = np.sqrt(np.nanmean(dev_in ** 2, axis=0))
            sd_out = np.sqrt(np.nanmean(dev_out ** 2, axis=0))
        floor = 1e-6  # a shadow set that agrees exactly (a prompt that never moved) must not divide by zero
        sd_in, sd_out = np.maximum(sd_in, floor), np.maximum(sd_out, floor)
        x = phi[target]
        scores[target] = np.where(ok, norm.logpdf(x, mu_in, sd_in) - norm.logpdf(x, mu_out, sd_out), np.nan)
    return scores


@dataclass
class AttackResult:
    auc: float
    tpr_at_1pct_fpr: float
    auc_ci95: tuple[float, float]
    pairs: int  # (target, example) pairs scored
    fpr: list[float]  # the ROC, for the plot
    tpr: list[float]
    pool_aucs: list[float]  # each pool's own AUC (one entry for a single pool)


def tpr_at_fpr(members: np.ndarray, scores: np.ndarray, fpr_max: float = 0.01) -> float:
    """The highest TPR whose FPR is at most ``fpr_max`` (0 when no threshold gets there)."""
    fpr, tpr, _ = roc_curve(members, scores)
    ok = fpr <= fpr_max
    return float(tpr[ok].max()) if ok.any() else 0.0


def auc_interval(scores: np.ndarray, members: np.ndarray, reps: int = 1000, seed: int = 0,
                 pools: np.ndarray | None = None) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUC, resampling pool examples (columns) with replacement;
    with ``pools`` (one pool id per column), within each pool, so every replicate keeps each pool's size."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(scores.shape[1])] if pools is None else [np.flatnonzero(pools == p) for p in np.unique(pools)]
    aucs = []
    for _ in range(reps):
        cols = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        s, m = scores[:, cols].ravel(), members[:, cols].ravel()
        keep = ~np.isnan(s)
        if m[keep].all() or not m[keep].any():
            continue
        aucs.append(roc_auc_score(m[keep], s[keep]))
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def _auc(scores: np.ndarray, members: np.ndarray) -> float:
    keep = ~np.isnan(scores)
    return float(roc_auc_score(members[keep], scores[keep]))


def evaluate_pools(phis: list[np.ndarray], memberships: list[np.ndarray], fixed_variance: bool = True,
                   reps: int = 1000, seed: int = 0) -> AttackResult:
    """LiRA within each pool (``phis[k]`` and ``memberships[k]``, both (S, N_k)), all pools' pairs in one ROC.
    Every pool needs the same number of shadows S (each shadow plays the target once)."""
    if not phis or len(phis) != len(memberships):
        raise ConfigError(f"need one membership matrix per pool's confidences, got {len(phis)} and {len(memberships)}")
    if len({np.shape(p)[0] for p in phis}) > 1:
        raise ConfigError(f"pools must have the same number of shadows, got {[np.shape(p)[0] for p in phis]}")
    per_pool = [(online_scores(p, m, fixed_variance), np.asarray(m, dtype=bool)) for p, m in zip(phis, memberships)]
    pool_aucs = [_auc(s, m) for s, m in per_pool]
    pool_ids = np.repeat(np.arange(len(per_pool)), [s.shape[1] for s, _ in per_pool])
    scores, members = np.hstack([s for s, _ in per_pool]), np.hstack([m for _, m in per_pool])
    keep = ~np.isnan(scores)
    truth, flat = members[keep], scores[keep]
    fpr, tpr, _ = roc_curve(truth, flat)
    return AttackResult(auc=_auc(scores, members), tpr_at_1pct_fpr=tpr_at_fpr(truth, flat),
                        auc_ci95=auc_interval(scores, members, reps, seed, pool_ids), pairs=int(keep.sum()),
                        fpr=fpr.tolist(), tpr=tpr.tolist(), pool_aucs=pool_aucs)


def evaluate_attack(phi: np.ndarray, members: np.ndarray, fixed_variance: bool = True, reps: int = 1000,
                    seed: int = 0) -> AttackResult:
    """LiRA over all (target, example) pairs of one pool's ``phi`` (S, N) with membership ``members`` (S, N)."""
    return evaluate_pools([phi], [members], fixed_variance, reps, seed)
