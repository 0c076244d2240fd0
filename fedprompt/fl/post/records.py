"""The layout of POST's Flower messages.

Server -> client (``MessageType.TRAIN``)::

    "arrays": ArrayRecord {"prompt": Array float32 (P, H)}   the global soft prompt
    "config": ConfigRecord {"server-round": int}

Client -> server (the reply)::

    "arrays":  ArrayRecord {"prompt": Array float32 (P, H)}  the client's locally tuned prompt
    "metrics": MetricRecord {...}                            numbers only, see :data:`REPLY_METRICS`

FedAvg averages the "prompt" arrays weighted by "num-examples". Without DP the metrics are all of
:data:`REPLY_METRICS`. With DP the reply carries :data:`DP_REPLY_METRICS` only: the prompt is the output
of DP-SGD, and every number beside it is a function of public values (the client's example count N, which
is released, and the run's hyper-parameters); the loss, the batches' token and example counts and the
training time are computed from the client's data, so a DP client keeps them (client.LOCAL_LOG).

A client's accountant lives in its ``context.state`` (Flower keeps it per node for the whole run) as
:data:`PRIVACY_STATE`: the noise multiplier, sampling rate and number of steps of each stretch of steps.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedprompt.fl.records import arrays_to_prompt
from fedprompt.models.soft_prompt import SoftPrompt

PROMPT = "prompt"
PRIVACY_STATE = "post-privacy"

REPLY_METRICS = (
    "num-examples",      # the client's training examples: FedAvg's weight
    "partition-id",      # which client this is (for the per-client privacy report)
    "loss",              # mean training loss over the round's non-empty batches
    "steps",             # optimizer steps this round
    "examples-seen",     # examples in this round's batches
    "empty-batches",     # Poisson batches that drew no example (DP only)
    "tokens",            # token positions run forward and backward this round
    "train-s",           # wall time of the local training
    "epsilon",           # DP only: cumulative epsilon of this client after this round
    "delta",             # DP only
    "noise-multiplier",  # DP only: sigma of this client's DP-SGD
)
# What a DP client sends beside its noisy prompt: N (public: FedAvg's weight, the sampling rate) and values
# computed from N and the run's hyper-parameters alone (the accountant's epsilon and delta, sigma, the steps).
DP_REPLY_METRICS = ("num-examples", "partition-id", "steps", "epsilon", "delta", "noise-multiplier")


def soft_prompt(arrays: ArrayRecord) -> SoftPrompt:
    """The soft prompt of an ArrayRecord (``{"prompt": (P, H)}``, :func:`fedprompt.fl.records.prompt_to_arrays`)."""
    weight = arrays_to_prompt(arrays, {PROMPT: (None, None)})[PROMPT]
    return SoftPrompt(weight.shape[0], weight.shape[1], torch.from_numpy(weight))


def history_to_record(history: list[tuple[float, float, int]]) -> ConfigRecord:
    return ConfigRecord({"noise-multiplier": [float(h[0]) for h in history], "sample-rate": [float(h[1]) for h in history],
                         "steps": [int(h[2]) for h in history]})


def record_to_history(record: ConfigRecord | None) -> list[tuple[float, float, int]]:
    if record is None:
        return []
    return list(zip(map(float, record["noise-multiplier"]), map(float, record["sample-rate"]), map(int, record["steps"])))
