"""What every method's client shares: its per-run state, built once per process and run, the round's facts
(which partition, which round, the round's seed) checked against the federation, and the one seed formula.

A method's client module declares its state as a small dataclass and ``STATE = PerRun(build, release)``; its
``train(msg, context, cfg)`` starts with ``state = STATE.get(context, cfg)`` and ``now = ClientRound.of(msg,
context, cfg, len(state.data.partition.clients))``. Cross-round state that must survive a resume lives in
``context.state`` only (the ClientApp saves it), never in the per-run state. It answers with :func:`reply`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedprompt.fl.records import ARRAYS, METRICS, server_round_of

S = TypeVar("S")


def round_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's work in one round: distinct per (run seed, round, partition), the same in every
    run and after a resume (round 0: the client's per-run draws, e.g. how it splits its data)."""
    return int(np.random.SeedSequence((int(run_seed), int(server_round), int(partition_id))).generate_state(1)[0])


@dataclass(frozen=True)
class ClientRound:
    """The facts of one client's round: its partition, the round, and the round's seed (:func:`round_seed`)."""

    partition_id: int
    server_round: int
    seed: int

    @classmethod
    def of(cls, msg: Message, context: Context, cfg, num_partitions: int) -> ClientRound:
        """This node's round; a RuntimeError when the SuperNodes are not ``federation.num_clients`` partitions."""
        partition_id, nodes = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        if nodes != num_partitions or not 0 <= partition_id < num_partitions:
            raise RuntimeError(f"{nodes} SuperNodes (this one partition {partition_id}) but federation.num_clients="
                               f"{num_partitions}")
        server_round = server_round_of(msg)
        return cls(partition_id, server_round, round_seed(int(cfg.seed), server_round, partition_id))


class PerRun(Generic[S]):
    """What a client process builds once per run and reuses every round (Ray keeps its actors alive).

    ``build(cfg, node_config)``: the node config matters to a SuperNode with its own data folder (``data-dir``,
    fedprompt.runs.node_data), whose client data is that folder alone. Keyed by the run's serialized config
    (``fedprompt-config``) and that folder with its partition id; a new run in the same process first releases the previous run's
    state (``release``, e.g. closing a black box's connections): one run per process at a time.
    """

    def __init__(self, build: Callable[[Any, Any], S], release: Callable[[S], None] | None = None) -> None:
        self.build, self.release = build, release
        self.key: str | None = None
        self.value: S | None = None

    def get(self, context: Context, cfg) -> S:
        from fedprompt.runs.node_data import NODE_DATA_KEY
        from fedprompt.runs.run_config import RUN_CONFIG_KEY

        node = context.node_config
        own = f"{node[NODE_DATA_KEY]}\0{node.get('partition-id')}" if node.get(NODE_DATA_KEY) else ""
        key = f"{context.run_config.get(RUN_CONFIG_KEY) or ''}\0{own}"
        if self.key != key or self.value is None:
            self.clear()
            self.value, self.key = self.build(cfg, context.node_config), key
        return self.value

    def clear(self) -> None:
        if self.value is not None and self.release is not None:
            self.release(self.value)
        self.key, self.value = None, None


def usage_metrics(usage) -> dict[str, int]:
    """A black box's accounting of the client's round (a ``Usage``) as reply metrics: ``bb-requests``, ..."""
    return {f"bb-{key.replace('_', '-')}": getattr(usage, key)
            for key in ("requests", "prompt_tokens", "bytes_sent", "bytes_received")}


def reply(msg: Message, arrays: ArrayRecord, metrics: dict) -> Message:
    """The client's reply: its arrays and its numbers ("arrays", "metrics"; a None metric is left out)."""
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord({k: v for k, v in metrics.items() if v is not None})})
    return Message(content, reply_to=msg)
