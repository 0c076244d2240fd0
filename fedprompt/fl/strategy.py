"""The one strategy every method's server runs: Flower's ``Strategy`` with FedAvg's conventions (fraction,
minimum nodes, ``weighted_by_key``, ``train_metrics_aggr_fn``), the per-round record a run report needs, and
the reply loop written once.

Each round (driven by :class:`fedprompt.fl.rounds.RoundDriver`):

1. ``configure_train``: wait until ``min_available_nodes`` SuperNodes are connected, ask each once per run which
   partition it holds (a ``query.partition`` message, answered by ``fedprompt.fl.client_app.partition``: node ids
   are random per run, partition ids are not), draw :meth:`FedStrategy.sample_size` of the partitions with a
   generator seeded by (``seed``, round) and send each the global arrays and ``server-round``. Nodes that report
   no partition are drawn by their sorted node ids instead (not reproducible across runs; logged).
2. ``aggregate_train``: every reply is audited as received (``audit_path``); sampled nodes that never replied,
   error replies and replies the method's :meth:`FedStrategy.invalid` refuses are recorded as failures and left
   out; the valid ones, in partition order (ties by the content's digest, never by node id), are recorded
   (bytes, each client's metrics in ``aggregation["clients"]``, the metrics combined by ``train_metrics_aggr_fn``);
   with fewer than ``min_replies`` of them the round is recorded as skipped and the global arrays are kept,
   else :meth:`FedStrategy.aggregate` makes the new global arrays.

There is no federated evaluation: the driver scores the global arrays centrally.

A method subclasses :class:`FedStrategy` and overrides what differs: :meth:`~FedStrategy.invalid` (its reply
checks), :meth:`~FedStrategy.aggregate` (its rule), and where needed :meth:`~FedStrategy.start_round` (what it
keeps of the global arrays), :meth:`~FedStrategy.record` (its per-round details), :meth:`~FedStrategy.skip_reason`,
:meth:`~FedStrategy.sample_size` or the metric combiner.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprompt.fl.records import ARRAYS, CONFIG, METRICS, array_record, audit_replies, record_bytes, serialize_content
from fedprompt.runs.report import RoundStats

WEIGHT_KEY = "num-examples"
PARTITION_QUERY = "query.partition"  # answered by fedprompt.fl.client_app.partition

# How train_metrics_aggr_fn combines the clients' metrics: costs are summed, the privacy guarantee is the
# largest, the rest (losses, accuracies, entropies) is the weighted mean over the clients that report it.
SUMMED = ("num-examples", "queries", "steps", "evaluations", "examples-seen", "empty-batches", "tokens")
MAXED = {"epsilon": "epsilon-max", "delta": "delta-max"}
NOT_COMBINED = ("partition-id", "queries-total")


def combine_metrics(clients: Sequence[dict], weighted_by_key: str = WEIGHT_KEY) -> dict[str, float]:
    """The round's metrics from each client's: counts, ``bb-*`` accounting and times (``*-s``) summed, ``epsilon``
    and ``delta`` as their largest value (``epsilon-max``, ``delta-max``), every other number the mean weighted by
    ``weighted_by_key`` (1 for a client without it), each over the clients that report it."""
    out: dict[str, float] = {}
    for key in sorted({k for c in clients for k in c} - set(NOT_COMBINED)):
        have = [(float(c.get(weighted_by_key, 1.0)), float(c[key])) for c in clients if key in c]
        if key in MAXED:
            out[MAXED[key]] = max(v for _, v in have)
        elif key in SUMMED or key.startswith("bb-") or key.endswith("-s"):
            out[key] = float(sum(v for _, v in have))
        else:
            total = sum(w for w, _ in have)
            out[key] = float(sum(w * v for w, v in have) / total) if total else float(np.mean([v for _, v in have]))
    return out


def sample_partitions(keys: Sequence[int], k: int, seed: int, server_round: int) -> list[int]:
    """``k`` of ``keys`` (partition ids), uniformly without replacement, a function of (seed, round) only."""
    keys = sorted(keys)
    rng = np.random.default_rng(np.random.SeedSequence((int(seed), int(server_round))))
    # Indices, not ids: node ids (the fallback) are 64-bit unsigned and numpy would turn large ones into floats.
    return sorted(keys[i] for i in rng.choice(len(keys), size=min(k, len(keys)), replace=False))


def metrics_of(msg: Message) -> dict:
    return dict(msg.content[METRICS]) if METRICS in msg.content else {}


def reply_order(msg: Message) -> tuple:
    """Sort key of a reply: its partition id, ties by the content's digest (error replies last); never the node
    id of a valid reply, which is random per run."""
    if msg.has_error():
        return (1, math.inf, "")
    try:
        pid = float(metrics_of(msg).get("partition-id", -1))
    except (TypeError, ValueError):
        pid = -1.0
    return (0, pid, hashlib.sha256(serialize_content(msg.content)).hexdigest())


class FedStrategy(Strategy):
    """The shared server loop (see the module's docstring); ``self.rounds[r]`` is round r's :class:`RoundStats`.

    ``audit_path``: where ``federation.audit_replies`` appends every reply as received (None: nowhere).
    ``train_metrics_aggr_fn(clients, weighted_by_key) -> dict``: the round's metrics from the valid replies'
    (in partition order); :func:`combine_metrics` by default.
    """

    weighted_by_key = WEIGHT_KEY
    kept = "global prompt"  # what a skipped round keeps, for the log

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1, min_available_nodes: int = 1,
                 min_replies: int = 1, seed: int = 0, audit_path: str | Path | None = None,
                 wait_for_nodes_s: float = 300.0,
                 train_metrics_aggr_fn: Callable[[list[dict], str], dict[str, float]] | None = None) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        self.fraction_train, self.min_train_nodes = float(fraction_train), int(min_train_nodes)
        self.min_available_nodes, self.min_replies = int(min_available_nodes), int(min_replies)
        self.seed, self.wait_for_nodes_s = int(seed), float(wait_for_nodes_s)
        self.audit_path = Path(audit_path) if audit_path else None
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or combine_metrics
        self.rounds: dict[int, RoundStats] = {}
        self._sent: list[Message] = []  # this round's messages; the Grid sets their ids when it sends them
        self._partition_of: dict[int, int] = {}  # node id -> partition id, asked once per node

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction %.2f, at least %d of %d+ nodes, seed %d", self.fraction_train,
            self.min_train_nodes, self.min_available_nodes, self.seed)
        log(INFO, "\t└──> Aggregation: %s, at least %d valid replies", type(self).__name__, self.min_replies)

    # --- sampling ---------------------------------------------------------------------------------------------

    def sample_size(self, available: int) -> int:
        """Clients a round: ``max(ceil(fraction_train x N), min_train_nodes)``, at most N."""
        return min(available, max(math.ceil(self.fraction_train * available), self.min_train_nodes))

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.min_available_nodes} SuperNodes connected after "
                                   f"{self.wait_for_nodes_s:.0f} s; a simulation needs --federation-config "
                                   f"num-supernodes={self.min_available_nodes} (fedprompt run sets it)")
            time.sleep(0.5)
        return nodes

    def _ask_partitions(self, server_round: int, nodes: Sequence[int], grid: Grid) -> None:
        unknown = [n for n in nodes if n not in self._partition_of]
        if not unknown:
            return
        asks = [Message(RecordDict(), message_type=PARTITION_QUERY, dst_node_id=n) for n in unknown]
        answers = list(grid.send_and_receive(asks, timeout=self.wait_for_nodes_s))
        audit_replies(self.audit_path, server_round, answers)  # client-to-server messages too
        for reply in answers:
            pid = metrics_of(reply).get("partition-id") if not reply.has_error() else None
            if pid is not None:
                self._partition_of[int(reply.metadata.src_node_id)] = int(pid)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """The round's node ids: a seeded draw of partitions (see the module's docstring)."""
        nodes = self._nodes(grid)
        self._ask_partitions(server_round, nodes, grid)
        size = self.sample_size(len(nodes))
        by_partition = {self._partition_of[n]: n for n in nodes if n in self._partition_of}
        if len(by_partition) == len(nodes):
            chosen = sorted(by_partition[p] for p in sample_partitions(list(by_partition), size, self.seed, server_round))
        else:
            log(WARNING, "configure_train: %d of %d nodes report no partition; sampling node ids (not reproducible "
                "across runs)", len(nodes) - len(by_partition), len(nodes))
            chosen = sample_partitions(nodes, size, self.seed, server_round)
        log(INFO, "configure_train: sampled %d of %d nodes", len(chosen), len(nodes))
        return chosen

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """What a method keeps of the round's global arrays (e.g. their shape, to check the replies against)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.started = time.perf_counter()
        self.start_round(server_round, arrays)
        nodes = self.sample(server_round, grid)
        config["server-round"] = server_round
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        stats.nodes, stats.sampled, stats.bytes_down = nodes, len(nodes), record_bytes(content) * len(nodes)
        self._sent = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
        return self._sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the global arrays are scored centrally (fedprompt.fl.rounds.RoundDriver)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # --- replies ----------------------------------------------------------------------------------------------

    def sender(self, reply: Message) -> int:
        """The sampled node a reply answers for: Flower's own error replies (a lost node) come from the SuperLink."""
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent if m.metadata.message_id}
        return sent.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))

    def invalid(self, msg: Message) -> str | None:
        """Why a reply without an error is refused (``"malformed reply: ..."``), or None to take it."""
        return None

    def weighted_layout(self, msg: Message, decode: Callable[[ArrayRecord], object] | None = None) -> str | None:
        """The check of a FedAvg-like reply: exactly "arrays" and "metrics", a positive ``weighted_by_key``, and
        arrays that ``decode`` (the method's codec, raising ValueError) accepts."""
        if set(msg.content.keys()) != {ARRAYS, METRICS}:
            return f"malformed reply: records {sorted(msg.content.keys())}"
        try:
            weight = float(metrics_of(msg).get(self.weighted_by_key, 0))
        except (TypeError, ValueError):
            weight = 0.0
        if not weight > 0:
            return f"malformed reply: no positive {self.weighted_by_key!r}"
        if decode is None:
            return None
        try:
            decode(array_record(msg.content))
        except ValueError as err:
            return f"malformed reply: {err}"
        return None

    def record(self, stats: RoundStats, valid: list[Message]) -> None:
        """A method's per-round details from the valid replies (``client_prompts``, ``aggregation``), skipped or not."""

    def skip_reason(self, stats: RoundStats, valid: list[Message]) -> str | None:
        """Why the round keeps the global arrays: fewer than ``min_replies`` valid replies."""
        if len(valid) < max(self.min_replies, 1):
            return f"{len(valid)} valid replies < federation.min_replies={self.min_replies}"
        return None

    def discard(self, server_round: int, valid: list[Message]) -> None:
        """Undo what accepting a skipped round's replies did (nothing here)."""

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord | None:
        """The new global arrays from the valid replies (in partition order); None keeps the global arrays."""
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = sorted(replies, key=self.sender)
        audit_replies(self.audit_path, server_round, replies, node_of=self.sender)
        stats.missing = max(0, stats.sampled - len(replies))
        for node in sorted(set(stats.nodes) - {self.sender(m) for m in replies}):  # the round's timeout passed first
            stats.failures.append({"node": node, "code": None, "reason": "no reply within federation.round_timeout_s"})
        valid: list[Message] = []
        failed: list[dict[str, Any]] = []
        for msg in sorted(replies, key=lambda m: (reply_order(m), self.sender(m))):  # invalid() sees them in this order
            if msg.has_error():
                failed.append({"node": self.sender(msg), "code": int(msg.error.code), "reason": str(msg.error.reason)})
            elif reason := self.invalid(msg):
                failed.append({"node": self.sender(msg), "code": -1, "reason": reason})
            else:
                valid.append(msg)
                stats.bytes_up += record_bytes(msg.content)
        for failure in sorted(failed, key=lambda f: f["node"]):
            stats.failures.append(failure)
            log(WARNING, "aggregate_train: node %d skipped (%s)", failure["node"], failure["reason"])
        stats.replies = len(valid)
        clients = [metrics_of(m) for m in valid]
        stats.aggregation["clients"] = clients
        self.record(stats, valid)
        arrays = None
        stats.skipped = self.skip_reason(stats, valid)
        if stats.skipped:
            log(WARNING, "aggregate_train: round %d skipped (%s); the %s is kept", server_round, stats.skipped, self.kept)
            self.discard(server_round, valid)
        stats.metrics = dict(self.train_metrics_aggr_fn(clients, self.weighted_by_key)) if clients else {}
        if not stats.skipped:
            arrays = self.aggregate(server_round, valid)
        stats.train_s = time.perf_counter() - stats.started
        return arrays, MetricRecord(dict(stats.metrics)) if valid else None
