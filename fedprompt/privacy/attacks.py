"""Attacks that measure how much of a privatized text can be recovered.

Nearest-neighbour embedding inversion (Song & Raghunathan 2020; the attack RAPT reports): the attacker
holds the public embedding matrix and sees what left the user, here the privatized tokens. For each
observed token it looks up its embedding and guesses the ``k`` nearest vocabulary tokens as the original.
A token counts as recovered at ``k`` when the original is among those guesses; ``recovered@1`` is
"the fraction of original tokens recovered". Against the d_chi mechanism, where the observed token is
already the nearest token to the noisy embedding, the top-1 guess is the observed token itself (up to
tokens with identical embeddings), so ``recovered@1`` equals the fraction of tokens the noise left
unchanged; ``recovered@k`` for ``k > 1`` also counts near misses.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedprompt.errors import DataError


@torch.no_grad()
def nearest_neighbour_inversion(observed: Sequence[int] | np.ndarray, embedding: torch.Tensor, k: int = 1,
                                chunk_size: int = 1024) -> np.ndarray:
    """``(len(observed), k)`` guesses: the ``k`` vocabulary tokens nearest to each observed token's embedding."""
    observed = np.asarray(observed, dtype=np.int64)
    unique, inverse = np.unique(observed, return_inverse=True)  # each distinct token is searched once
    table = embedding.detach().float()
    sq = (table * table).sum(1)
    guesses = np.empty((unique.size, k), dtype=np.int64)
    for start in range(0, unique.size, chunk_size):
        rows = table[torch.as_tensor(unique[start : start + chunk_size])]
        dist = sq[None, :] - 2.0 * rows @ table.T  # ||e||^2 - 2<e, row>: the row's own norm is a constant
        guesses[start : start + rows.shape[0]] = dist.topk(k, dim=1, largest=False).indices.cpu().numpy()
    return guesses[inverse.reshape(-1)]


def token_recovery(original: Sequence[Sequence[int]], privatized: Sequence[Sequence[int]], embedding: torch.Tensor,
                   top_k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of original tokens the nearest-neighbour inversion recovers from the privatized ones.

    Sequences are aligned token by token (the d_chi mechanism keeps lengths). Returns ``recovered@k`` for
    each ``k`` in ``top_k``, ``unchanged`` (privatized token == original) and ``tokens`` (how many).
    """
    if len(original) != len(privatized) or any(len(a) != len(b) for a, b in zip(original, privatized)):
        raise DataError("token_recovery needs the original and privatized sequences aligned token by token")
    truth = np.fromiter((t for s in original for t in s), dtype=np.int64)
    seen = np.fromiter((t for s in privatized for t in s), dtype=np.int64)
    if truth.size == 0:
        raise DataError("token_recovery got no tokens")
    guesses = nearest_neighbour_inversion(seen, embedding, k=max(top_k))
    result = {f"recovered@{k}": float((guesses[:, :k] == truth[:, None]).any(1).mean()) for k in top_k}
    result.update(unchanged=float((seen == truth).mean()), tokens=int(truth.size))
    return result
