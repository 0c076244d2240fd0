"""The layout of RAPT's Flower messages.

Server -> client (``MessageType.TRAIN``)::

    "arrays": ArrayRecord {"soft-prompt": float32 (tokens, hidden)}   the current prompt (clients need not use it)
    "config": ConfigRecord {"server-round": int}

Client -> server (the reply): this round's share of the client's examples, privatized on the client::

    "arrays": ArrayRecord {
        "ids":          int32 (total,)      privatized [plain tokens + text tokens] of every example, concatenated
        "lengths":      int32 (n,)          ids per example
        "labels":       int32 (n,)
        "plain":        int32 (n, m)        the plain tokens in clear (random public tokens: the reconstruction targets)
        "pair-ids":     int32 (total_pair,) privatized text_pair tokens (pair tasks; empty otherwise)
        "pair-lengths": int32 (n or 0,)
    }
    "metrics": MetricRecord {"num-examples", "tokens", "tokens-unchanged", "privatize-s", "partition-id"}   numbers only

Nothing else leaves a client: no raw text, no raw token ids. ``tokens-unchanged`` is the fraction of the
client's text tokens the noise left as they were (what nearest-neighbour inversion recovers), an aggregate;
``partition-id`` orders the replies on the server (node ids are random per run; POST and BBT send it too).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from fedprompt.methods.rapt.inputs import PrivateExample

SOFT_PROMPT = "soft-prompt"
DATA_KEYS = ("ids", "lengths", "labels", "plain", "pair-ids", "pair-lengths")
REPLY_METRICS = ("num-examples", "tokens", "tokens-unchanged", "privatize-s", "partition-id")


def examples_to_arrays(examples: Sequence[PrivateExample], plain_tokens: int) -> ArrayRecord:
    pairs = [e.pair_ids for e in examples if e.pair_ids is not None]
    if pairs and len(pairs) != len(examples):
        raise ValueError("either every example of a reply has a text_pair or none has")

    def ints(values) -> Array:
        return Array(np.asarray(values, dtype=np.int32))

    return ArrayRecord({
        "ids": ints([t for e in examples for t in e.ids]),
        "lengths": ints([len(e.ids) for e in examples]),
        "labels": ints([e.label for e in examples]),
        "plain": ints(np.asarray([e.plain for e in examples], dtype=np.int32).reshape(len(examples), plain_tokens)),
        "pair-ids": ints([t for p in pairs for t in p]),
        "pair-lengths": ints([len(p) for p in pairs]),
    })


def arrays_to_examples(arrays: ArrayRecord) -> list[PrivateExample]:
    """The privatized examples of a reply; raises ValueError on a malformed one."""
    missing = sorted(set(DATA_KEYS) - set(arrays.keys()))
    if missing:
        raise ValueError(f"reply lacks arrays {missing}")
    get = {key: arrays[key].numpy().astype(np.int64) for key in DATA_KEYS}
    lengths, labels, plain = get["lengths"], get["labels"], get["plain"]
    n = lengths.size
    if labels.size != n or plain.shape[0] != n or int(lengths.sum()) != get["ids"].size or (lengths < 0).any():
        raise ValueError("reply arrays disagree on the number of examples or tokens")
    pair_lengths = get["pair-lengths"]
    if pair_lengths.size not in (0, n) or int(pair_lengths.sum()) != get["pair-ids"].size:
        raise ValueError("reply pair arrays disagree with the examples")
    ids = np.split(get["ids"], np.cumsum(lengths)[:-1]) if n else []
    pair_ids = np.split(get["pair-ids"], np.cumsum(pair_lengths)[:-1]) if pair_lengths.size else [None] * n
    return [PrivateExample(tuple(i.tolist()), int(y), None if p is None else tuple(p.tolist()), tuple(k.tolist()))
            for i, y, p, k in zip(ids, labels, pair_ids, plain)]
