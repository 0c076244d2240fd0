"""FedAvg of soft prompts: Flower's Message-API FedAvg, weighted by each client's number of examples (public,
DP or not: docs/privacy.md), plus the per-round record the run report needs (sizes, failures, each client's
metrics and epsilon)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fedprompt.fl.fedavg import RecordedFedAvg
from fedprompt.fl.post.records import PROMPT
from fedprompt.fl.records import ARRAYS, METRICS, audit_replies, record_bytes
from fedprompt.fl.report import RoundStats
from fedprompt.fl.rounds import too_few_replies

WEIGHT_KEY = "num-examples"
_SUMMED = ("steps", "examples-seen", "empty-batches", "tokens", "train-s")


class PromptFedAvg(RecordedFedAvg):
    """``FedAvg`` (McMahan et al. 2017) over the ``"prompt"`` array, weighted by ``"num-examples"``.

    Replies that are errors, or that do not carry a prompt of the global prompt's shape and a positive
    example count, are recorded as failures and left out of the average (plain FedAvg would stop the run).
    Fewer than ``min_replies`` valid replies (``federation.min_replies``): the round is recorded as skipped and
    the global prompt is kept.
    ``self.rounds[r]`` holds round r's :class:`RoundStats`; its ``aggregation["clients"]`` lists every
    client's metrics (epsilon included) in partition order.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        self._shape: tuple[int, ...] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._shape = tuple(arrays[PROMPT].shape)
        return super().configure_train(server_round, arrays, config, grid)

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
        stats.replies = len(valid)
        valid.sort(key=lambda m: float(m.content[METRICS].get("partition-id", -1)))  # node ids are random per run
        clients = [dict(m.content[METRICS]) for m in valid]
        stats.aggregation = {"clients": clients}
        stats.metrics = _combine(clients)
        skipped = too_few_replies(stats, len(valid), max(self.min_replies, 1), server_round)
        arrays, _ = (None, None) if skipped else super().aggregate_train(server_round, valid)
        stats.train_s = time.perf_counter() - stats.started
        return arrays, MetricRecord(stats.metrics) if clients else None

    def _invalid(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"error {msg.error.code}: {msg.error.reason}"
        content = msg.content
        if set(content.keys()) != {ARRAYS, METRICS} or PROMPT not in content[ARRAYS]:
            return f"malformed reply: records {sorted(content.keys())}"
        if tuple(content[ARRAYS][PROMPT].shape) != self._shape:
            return f"malformed reply: prompt of shape {tuple(content[ARRAYS][PROMPT].shape)}, expected {self._shape}"
        if not float(content[METRICS].get(WEIGHT_KEY, 0)) > 0:
            return f"malformed reply: no positive {WEIGHT_KEY!r}"
        return None


def _combine(clients: list[dict]) -> dict[str, float]:
    """Costs summed over the clients that report them; the loss weighted by examples (when every client reports
    one: DP clients report none); the largest epsilon and delta (the run's guarantee)."""
    if not clients:
        return {}
    weights = [float(c[WEIGHT_KEY]) for c in clients]
    out = {key: float(sum(float(c.get(key, 0)) for c in clients)) for key in _SUMMED if any(key in c for c in clients)}
    if all("loss" in c for c in clients):
        out["loss"] = float(sum(w * float(c["loss"]) for w, c in zip(weights, clients)) / sum(weights))
    out[WEIGHT_KEY] = float(sum(weights))
    for key, name in (("epsilon", "epsilon-max"), ("delta", "delta-max")):
        values = [float(c[key]) for c in clients if key in c]
        if values:
            out[name] = max(values)
    return out
