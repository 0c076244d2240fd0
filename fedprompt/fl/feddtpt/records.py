"""The layout of FedDTPT's Flower messages, and how big they are.

Server -> client (``MessageType.TRAIN``)::

    "arrays": ArrayRecord {"prompt": Array uint8}   the global prompt, UTF-8 of its words joined by " "
    "config": ConfigRecord {"server-round": int}

Client -> server (the reply)::

    "arrays":  ArrayRecord {"prompt": Array uint8}  the client's searched prompt, same encoding
    "metrics": MetricRecord {...}                   numbers only, see :data:`REPLY_METRICS`

The prompt travels in an ArrayRecord because it is the method's "model": Flower's Strategy loop threads
the global ArrayRecord from round to round (``aggregate_train`` returns the next one, ``Result.arrays``
is the final one). Words never contain whitespace, so the prompt text is its own encoding. Nothing else
a client holds (examples, labels, the search's history of tried words) is ever put in a reply.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from fedprompt.fl.records import ARRAYS, CONFIG, METRICS  # noqa: F401 - re-exported: FedDTPT's message layout

PROMPT = "prompt"

# What a client reports besides its prompt: the search's own scores and costs.
REPLY_METRICS = (
    "batch-accuracy",   # final prompt on the search batch (local + public examples)
    "local-accuracy",   # final prompt on the local part of that batch
    "start-accuracy",   # the received prompt on the same batch
    "partition-id",     # which client this is (orders the replies on the server)
    "queries",          # examples scored by the black box for this search
    "steps",            # edit steps taken
    "prompt-length",    # words in the returned prompt
    "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",  # the black box's accounting
    "search-s",         # wall time of the search on the client
)


def words_to_arrays(words: Sequence[str]) -> ArrayRecord:
    words = [str(w) for w in words]
    if any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError(f"a prompt is a list of words without whitespace (empty: zero-shot), got {words!r}")
    data = np.frombuffer(" ".join(words).encode("utf-8"), dtype=np.uint8)
    return ArrayRecord({PROMPT: Array(data.copy())})


def arrays_to_words(arrays: ArrayRecord) -> list[str]:
    if PROMPT not in arrays:
        raise ValueError(f"the ArrayRecord carries no {PROMPT!r} array (keys: {list(arrays)})")
    # An empty prompt is the zero-shot instruction: a client's search may delete every word.
    return arrays[PROMPT].numpy().astype(np.uint8).tobytes().decode("utf-8").split()
