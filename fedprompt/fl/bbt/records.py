"""The layout of FedAvg-BBT's and FedBPT's Flower messages.

Server -> client (``MessageType.TRAIN``)::

    "arrays": ArrayRecord {"z": Array float32 (d,), "sigma": Array float32 (1,)}   the global search point
    "config": ConfigRecord {"server-round": int}

``z`` is the global point in the search space (FedBPT: the global CMA mean); ``sigma`` the step size the
clients start CMA-ES with (FedAvg-BBT: always ``method.sigma0``; FedBPT: the aggregated step size).

Client -> server (the reply)::

    "arrays":  ArrayRecord {"z": Array float32 (d,), "sigma": Array float32 (1,)}
    "metrics": MetricRecord {...}                                  numbers only, see :data:`REPLY_METRICS`

The reply's ``z`` is the client's best z or its final CMA mean (FedAvg-BBT, ``method.client_return``) or
its final CMA mean (FedBPT), ``sigma`` its final step size. Only d + 1 numbers go up: the projection A
and P0 are rebuilt from the shared seed on every side. The client's examples, labels and its CMA-ES
covariance stay on the client.

The client's ``context.state`` holds :data:`STATE` (a MetricRecord): its cumulative queries over the run.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedprompt.fl.records import arrays_to_prompt, prompt_to_arrays

Z, SIGMA = "z", "sigma"
STATE = "bbt"

REPLY_METRICS = (
    "num-examples",       # the client's training examples: the aggregation weight
    "partition-id",       # which client this is
    "queries",            # texts scored by the black box this round (batch x candidates)
    "queries-total",      # the same, cumulative over the run (kept in context.state)
    "loss",               # lowest candidate loss (label cross-entropy on its batch)
    "last-loss",          # mean candidate loss of the last CMA-ES iteration
    "iterations",         # CMA-ES iterations run (fewer than method.local_iterations if CMA-ES converged)
    "evaluations",        # candidates scored
    "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",  # the black box's accounting
    "search-s",           # wall time of the local search
)


def point_to_arrays(z: np.ndarray, sigma: float) -> ArrayRecord:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 1 or not np.isfinite(z).all() or not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"a search point is a finite vector and a positive step size, got shape {z.shape}, sigma {sigma}")
    return prompt_to_arrays({Z: z, SIGMA: [sigma]})


def arrays_to_point(arrays: ArrayRecord, dim: int | None = None) -> tuple[np.ndarray, float]:
    """(z, sigma) of an ArrayRecord; a ValueError when it is malformed (wrong keys, shapes, values)."""
    point = arrays_to_prompt(arrays, {Z: (dim,), SIGMA: (1,)})
    if not point[SIGMA][0] > 0:
        raise ValueError(f"sigma must be one positive number, got {point[SIGMA].tolist()}")
    return point[Z], float(point[SIGMA][0])
