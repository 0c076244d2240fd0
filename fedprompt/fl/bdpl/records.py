"""The layout of BDPL's Flower messages.

Server -> client (``MessageType.TRAIN``)::

    "arrays": ArrayRecord {"logits": Array float32 (L, V)}   the global policy: one row of logits per slot
    "config": ConfigRecord {"server-round": int}

Client -> server (the reply)::

    "arrays":  ArrayRecord {"logits": Array float32 (L, V)}  the client's policy after its local steps
    "metrics": MetricRecord {...}                            numbers only, see :data:`REPLY_METRICS`

Candidate j of every slot is the j-th word of the run's candidate vocabulary, which the server and
every client build the same way from the same tokenizer (``method.vocab_model``), so only numbers
travel. With ``method.optimizer_state=keep`` a client's Adam moments stay in its ``context.state`` as
:data:`OPTIMIZER_STATE` (never sent).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedprompt.fl.records import ARRAYS, CONFIG, METRICS, arrays_to_prompt, prompt_to_arrays  # noqa: F401 - re-exported: BDPL's message layout

LOGITS = "logits"
OPTIMIZER_STATE = "bdpl-optimizer"

REPLY_METRICS = (
    "num-examples",      # the client's training examples: FedAvg's weight
    "partition-id",      # which client this is
    "loss",              # mean loss of the sampled prompts over the round's steps
    "local-accuracy",    # accuracy of the sampled prompts' predictions over the round's steps (free: same queries)
    "entropy",           # mean per-slot entropy of the returned policy (log V = uniform)
    "queries",           # examples scored by the black box this round (samples_per_step x batch per step)
    "steps",             # local steps taken
    "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",  # the black box's accounting
    "train-s",           # wall time of the local steps
)


def logits_to_arrays(logits: np.ndarray) -> ArrayRecord:
    return prompt_to_arrays({LOGITS: logits})


def arrays_to_logits(arrays: ArrayRecord, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The (L, V) logits of an ArrayRecord (exactly ``"logits"``, finite); ``shape`` is the one this run expects."""
    return arrays_to_prompt(arrays, {LOGITS: shape or (None, None)})[LOGITS]


def optimizer_to_arrays(m: np.ndarray, v: np.ndarray, t: int) -> ArrayRecord:
    return ArrayRecord({"m": Array(np.asarray(m, dtype=np.float64)), "v": Array(np.asarray(v, dtype=np.float64)),
                        "t": Array(np.array([t], dtype=np.int64))})


def arrays_to_optimizer(arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray, int]:
    return arrays["m"].numpy().copy(), arrays["v"].numpy().copy(), int(arrays["t"].numpy()[0])
