"""The server's two rules, as pure functions of the clients' replies (weights: their example counts n_k).

FedAvg-BBT (the FedAvg baseline of FedBPT's paper): each client k returns one point z_k (its best z, or
its CMA mean); the new global z is  z = sum_k n_k z_k / sum_k n_k.  The step size is not aggregated: every
client starts each round's CMA-ES at sigma0.

FedBPT (Sun et al. 2023, arXiv 2310.01467), as implemented here: each client k returns its final CMA-ES
distribution N(m_k, sigma_k^2 C_k); the server forms the global distribution
    m = sum_k n_k m_k / sum_k n_k,     sigma = sum_k n_k sigma_k / sum_k n_k,
and sends (m, sigma) back; C_k stays on the client and is not aggregated (each round's local CMA-ES
restarts with C = I around m with step size sigma).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _weights(weights: Sequence[float], count: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if count == 0:
        raise ValueError("nothing to aggregate: no client reply")
    if w.shape != (count,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"need one positive, finite weight per client ({count}), got {list(weights)}")
    return w / w.sum()


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k v_k / sum_k w_k over vectors of one shape (float32 out, computed in float64)."""
    w = _weights(weights, len(vectors))
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    return np.tensordot(w, stacked, axes=1).astype(np.float32)


def fedavg_bbt(points: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg-BBT: the example-weighted mean of the clients' z."""
    return weighted_mean(points, weights)


def fedbpt(means: Sequence[np.ndarray], sigmas: Sequence[float], weights: Sequence[float]) -> tuple[np.ndarray, float]:
    """FedBPT: (example-weighted mean of the clients' CMA means, example-weighted mean of their step sizes)."""
    steps = np.asarray(sigmas, dtype=np.float64)
    if steps.shape != (len(means),) or not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        raise ValueError(f"need one positive step size per client, got {list(steps)}")
    w = _weights(weights, len(means))
    return weighted_mean(means, weights), float(w @ steps)
