"""BDPL's strategy: K clients per round sampled with a seeded generator, FedAvg of their logits.

FedOne (Wang et al. 2025) activates ONE client per round, uniformly at random: the server's policy
becomes that client's locally updated logits. With K > 1 activated clients ("federated BDPL") the new
logits are FedAvg's example-weighted mean of theirs (McMahan et al. 2017; the average is taken on the
logits, the parameters the clients optimise).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedprompt.fl.bdpl.records import LOGITS, arrays_to_logits
from fedprompt.fl.fedavg import RecordedFedAvg
from fedprompt.fl.records import ARRAYS, METRICS, audit_replies, record_bytes
from fedprompt.fl.report import RoundStats

WEIGHT_KEY = "num-examples"
_SUMMED = ("queries", "steps", "train-s")


PARTITION_QUERY = "query.partition"  # answered by fedprompt.fl.client_app.partition


def sample_clients(keys: Sequence[int], k: int, seed: int, server_round: int) -> list[int]:
    """``k`` of ``keys`` (partition ids), uniformly without replacement, a function of (seed, round) only."""
    return sorted(random.Random(int(seed) * 1000 + int(server_round)).sample(sorted(keys), min(k, len(keys))))


class BDPLFedAvg(RecordedFedAvg):
    """``FedAvg`` over the ``"logits"`` array, weighted by ``"num-examples"``, with seeded K-client sampling.

    ``configure_train`` waits for ``min_available_nodes`` SuperNodes, then activates ``clients_per_round``
    of them: :func:`sample_clients` draws partition ids, which every node reports once per run (a
    ``query.partition`` message; node ids are random per run, partition ids are not), so a seed activates
    the same clients in every run and after a resume. Nodes that report no partition (a deployment
    without partitions) are sampled by their sorted node ids instead. Error replies and replies without
    logits of the global shape or without a positive example count are recorded as failures and left
    out. Fewer than ``min_replies`` valid replies: the round is recorded as skipped and the global logits
    are kept. ``vocab`` (optional) lets the round record show each client's argmax prompt.
    """

    def __init__(self, clients_per_round: int = 1, seed: int = 0, min_replies: int = 1, min_available_nodes: int = 1,
                 vocab: Sequence[str] | None = None, wait_for_nodes_s: float = 300.0,
                 audit_path: str | Path | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients_per_round,
                         min_available_nodes=min_available_nodes, weighted_by_key=WEIGHT_KEY, audit_path=audit_path)
        self.clients_per_round, self.seed, self.min_replies = int(clients_per_round), int(seed), int(min_replies)
        self.vocab = list(vocab) if vocab is not None else None
        self.wait_for_nodes_s = wait_for_nodes_s
        self._shape: tuple[int, ...] | None = None
        self._partition_of: dict[int, int] = {}  # node id -> partition id, asked once per node

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: %d client(s) a round (1 = FedOne), seed %d", self.clients_per_round, self.seed)
        log(INFO, "\t└──> Aggregation: FedAvg of the logits weighted by %r", WEIGHT_KEY)

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.min_available_nodes} SuperNodes connected after "
                                   f"{self.wait_for_nodes_s:.0f} s")
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
            if reply.has_error() or METRICS not in reply.content or "partition-id" not in reply.content[METRICS]:
                continue
            self._partition_of[int(reply.metadata.src_node_id)] = int(reply.content[METRICS]["partition-id"])

    def _activate(self, server_round: int, nodes: Sequence[int], grid: Grid) -> list[int]:
        self._ask_partitions(server_round, nodes, grid)
        by_partition = {self._partition_of[n]: n for n in nodes if n in self._partition_of}
        if len(by_partition) == len(nodes):
            return sorted(by_partition[p] for p in sample_clients(list(by_partition), self.clients_per_round,
                                                                  self.seed, server_round))
        log(WARNING, "configure_train: %d of %d nodes report no partition; sampling node ids (not reproducible "
            "across runs)", len(nodes) - len(by_partition), len(nodes))
        return sample_clients(nodes, self.clients_per_round, self.seed, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        # Not FedAvg's sampling (the process's global `random`): a seeded draw per round, so a resumed run
        # activates the same clients as the uninterrupted one.
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.started = time.perf_counter()
        self._shape = tuple(arrays[LOGITS].shape)
        nodes = self._nodes(grid)
        chosen = self._activate(server_round, nodes, grid)
        config["server-round"] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in chosen]
        stats.nodes, stats.sampled = chosen, len(chosen)
        stats.bytes_down = record_bytes(content) * len(chosen)
        log(INFO, "configure_train: activated %d of %d nodes", len(chosen), len(nodes))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = list(replies)
        audit_replies(self.audit_path, server_round, replies)
        stats.missing = max(0, stats.sampled - len(replies))
        valid = []
        for msg in replies:
            reason = self._invalid(msg)
            if reason:
                stats.failures.append({"node": int(msg.metadata.src_node_id), "reason": reason})
                log(WARNING, "aggregate_train: node %d skipped (%s)", msg.metadata.src_node_id, reason)
                continue
            valid.append(msg)
            stats.bytes_up += record_bytes(msg.content)
        for _ in range(stats.missing):
            stats.failures.append({"node": None, "reason": "no reply within federation.round_timeout_s"})
        stats.replies = len(valid)
        valid.sort(key=lambda m: int(m.content[METRICS].get("partition-id", -1)))  # node ids are random per run
        clients = [dict(m.content[METRICS]) for m in valid]
        if self.vocab is not None:
            stats.client_prompts = [" ".join(self.vocab[int(i)] for i in arrays_to_logits(m.content[ARRAYS]).argmax(axis=1))
                                    for m in valid]
        stats.aggregation = {"clients": clients}
        stats.metrics = _combine(clients)
        stats.train_s = time.perf_counter() - stats.started
        if len(valid) < self.min_replies:
            stats.skipped = f"{len(valid)} valid replies < federation.min_replies={self.min_replies}"
            log(WARNING, "aggregate_train: round %d skipped (%s); the global logits are kept", server_round, stats.skipped)
            return None, MetricRecord(stats.metrics) if clients else None
        arrays, _ = super().aggregate_train(server_round, valid)
        return arrays, MetricRecord(stats.metrics)

    def _invalid(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"error {msg.error.code}: {msg.error.reason}"
        content = msg.content
        if set(content.keys()) != {ARRAYS, METRICS} or set(content[ARRAYS].keys()) != {LOGITS}:
            return f"malformed reply: records {sorted(content.keys())}"
        try:
            arrays_to_logits(content[ARRAYS], self._shape)
        except ValueError as err:
            return f"malformed reply: {err}"
        if not float(content[METRICS].get(WEIGHT_KEY, 0)) > 0:
            return f"malformed reply: no positive {WEIGHT_KEY!r}"
        return None


def _combine(clients: list[dict]) -> dict[str, float]:
    """Costs summed over the activated clients; loss, accuracy and entropy weighted by their examples."""
    if not clients:
        return {}
    weights = np.array([float(c[WEIGHT_KEY]) for c in clients])
    out = {key: float(sum(float(c.get(key, 0)) for c in clients)) for key in _SUMMED}
    out.update({key: float(sum(float(c.get(key, 0)) for c in clients))
                for key in sorted({k for c in clients for k in c if k.startswith("bb-")})})
    for key in ("loss", "local-accuracy", "entropy"):
        have = [(w, float(c[key])) for w, c in zip(weights, clients) if key in c]
        if have:
            out[key] = float(sum(w * v for w, v in have) / sum(w for w, _ in have))
    out[WEIGHT_KEY] = float(weights.sum())
    return out
