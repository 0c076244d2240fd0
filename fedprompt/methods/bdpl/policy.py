"""BDPL's policy: L independent categorical distributions over V candidate tokens, one per prompt slot.

The parameters are the logits ``theta`` (L, V); slot j's distribution is ``softmax(theta[j])``. A prompt
is one token index per slot, drawn independently, so

    log p(prompt) = sum_j log softmax(theta[j])[prompt[j]],
    d log p(prompt) / d theta[j] = onehot(prompt[j]) - softmax(theta[j]).

BDPL (Diao et al., TMLR 2023) estimates the gradient of the expected loss E_p[loss(prompt)] from I
sampled prompts with the variance-reduced (leave-one-out / mean-baseline) REINFORCE estimator

    g = 1 / (I - 1) * sum_i (loss_i - mean(loss)) * d log p(prompt_i) / d theta,

which is unbiased (the baseline's expectation cancels) and needs only the black box's losses. The
parameters move against it (the loss is minimised). Plain numpy: the policy is tiny and the client
needs no autograd for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (L, V) logits (float64, stable)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sample(logits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` prompts, (n, L) token indices, each slot drawn from its own categorical distribution."""
    probs = softmax(logits)
    # Inverse-CDF per slot: one uniform per (sample, slot), so the draw depends only on rng's state.
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((n, probs.shape[0]))
    idx = (u[:, :, None] * cdf[None, :, -1:] >= cdf[None, :, :]).sum(axis=-1)
    return np.minimum(idx, probs.shape[1] - 1).astype(np.int64)


def log_prob(logits: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """log p(prompt) of each sampled prompt: (n,) for samples (n, L)."""
    logp = np.log(softmax(logits))
    samples = np.atleast_2d(samples)
    return logp[np.arange(logp.shape[0])[None, :], samples].sum(axis=1)


def score_function(logits: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """d log p(prompt) / d logits, (L, V): onehot(prompt[j]) - softmax(logits[j]) in each slot j."""
    grad = -softmax(logits)
    grad[np.arange(grad.shape[0]), np.asarray(prompt)] += 1.0
    return grad


def variance_reduced_gradient(logits: np.ndarray, samples: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """BDPL's estimate of d E[loss] / d logits from I >= 2 sampled prompts and their losses."""
    samples, losses = np.atleast_2d(samples), np.asarray(losses, dtype=np.float64)
    if samples.shape[0] != losses.shape[0] or samples.shape[0] < 2:
        raise ValueError(f"need I >= 2 samples with one loss each, got {samples.shape[0]} samples, "
                         f"{losses.shape[0]} losses")
    advantages = losses - losses.mean()
    grad = np.zeros(np.shape(logits), dtype=np.float64)
    for prompt, advantage in zip(samples, advantages):
        grad += advantage * score_function(logits, prompt)
    return grad / (len(losses) - 1)


def policy_gradient_step(logits: np.ndarray, samples: np.ndarray, losses: np.ndarray, lr: float) -> np.ndarray:
    """One plain (SGD) step: ``logits - lr * g``; prompts with a below-average loss gain probability."""
    return np.asarray(logits, dtype=np.float64) - lr * variance_reduced_gradient(logits, samples, losses)


@dataclass
class Adam:
    """Adam (Kingma & Ba 2015) on the logits; ``m``, ``v``, ``t`` are its state (kept or reset per round)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    t: int = 0

    def step(self, logits: np.ndarray, grad: np.ndarray) -> np.ndarray:
        # first step, or a state of another shape: start afresh (m and v are set together)
        if self.m is None or self.v is None or self.m.shape != grad.shape:
            self.m, self.v, self.t = np.zeros_like(grad), np.zeros_like(grad), 0
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        return np.asarray(logits, dtype=np.float64) - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


@dataclass
class SGD:
    lr: float

    def step(self, logits: np.ndarray, grad: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64) - self.lr * grad


def entropy(logits: np.ndarray) -> float:
    """Mean per-slot entropy in nats (log V: uniform; 0: one token per slot)."""
    p = softmax(logits)
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1).mean())


def argmax_prompt(logits: np.ndarray) -> np.ndarray:
    """The final prompt: the most probable token of each slot (ties: the lowest index)."""
    return np.asarray(logits).argmax(axis=-1)
