"""FedAvg-BBT and FedBPT as a Flower strategy: Flower's FedAvg sampling and messages (RecordedFedAvg), with
the aggregation replaced by the two rules of :mod:`fedprompt.methods.bbt.aggregate`."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from fedprompt.fl.bbt.records import arrays_to_point, point_to_arrays
from fedprompt.fl.fedavg import RecordedFedAvg
from fedprompt.fl.records import ARRAYS, METRICS, audit_replies, record_bytes
from fedprompt.fl.report import RoundStats
from fedprompt.fl.rounds import too_few_replies
from fedprompt.methods.bbt.aggregate import fedavg_bbt, fedbpt

WEIGHT_KEY = "num-examples"
_SUMMED = ("queries", "evaluations", "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",
           "search-s")


class BBTStrategy(RecordedFedAvg):
    """Each round: FedAvg's sampling sends the global (z, sigma) to ``fraction_train`` of the clients; each
    runs local CMA-ES and replies with (z_k, sigma_k) and its example count n_k. Then

    - ``mode="fedavg"`` (FedAvg-BBT): z = sum n_k z_k / sum n_k; sigma stays ``sigma0``;
    - ``mode="fedbpt"`` (FedBPT): z = sum n_k z_k / sum n_k (the clients' CMA means), sigma = sum n_k sigma_k / sum n_k.

    Error replies and malformed ones (wrong keys or shapes, non-finite values, no positive n_k) are recorded
    as failures and left out; a round with fewer than ``min_replies`` valid replies keeps the global point.
    ``self.rounds[r]`` is round r's :class:`RoundStats` (clients' metrics in partition order).
    """

    def __init__(self, mode: str, intrinsic_dim: int, sigma0: float, min_replies: int = 1, **kwargs) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        if mode not in ("fedavg", "fedbpt"):
            raise ValueError(f"mode must be fedavg or fedbpt, got {mode!r}")
        self.mode, self.dim, self.sigma0, self.min_replies = mode, int(intrinsic_dim), float(sigma0), int(min_replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = list(replies)
        audit_replies(self.audit_path, server_round, replies)
        stats.missing = max(0, stats.sampled - len(replies))
        points, clients = [], []
        for msg in replies:
            point, reason = self._parse(msg)
            if reason:
                stats.failures.append({"node": int(msg.metadata.src_node_id), "reason": reason})
                log(WARNING, "aggregate_train: node %d skipped (%s)", msg.metadata.src_node_id, reason)
                continue
            points.append(point)
            clients.append(dict(msg.content[METRICS]))
            stats.bytes_up += record_bytes(msg.content)
        stats.replies = len(points)
        order = sorted(range(len(clients)), key=lambda i: clients[i].get("partition-id", -1))
        clients, points = [clients[i] for i in order], [points[i] for i in order]  # node ids are random per run
        stats.aggregation = {"clients": clients, "mode": self.mode}
        stats.metrics = _combine(clients)
        arrays = None
        if not too_few_replies(stats, len(points), self.min_replies, server_round, kept="global point"):
            weights = [float(c[WEIGHT_KEY]) for c in clients]
            if self.mode == "fedavg":
                z, sigma = fedavg_bbt([p[0] for p in points], weights), self.sigma0
            else:
                z, sigma = fedbpt([p[0] for p in points], [p[1] for p in points], weights)
            arrays = point_to_arrays(z, sigma)
            stats.aggregation.update(sigma=sigma, z_norm=float((z.astype("float64") ** 2).sum() ** 0.5))
        stats.train_s = time.perf_counter() - stats.started
        return arrays, MetricRecord(stats.metrics) if clients else None

    def _parse(self, msg: Message):
        if msg.has_error():
            return None, f"error {msg.error.code}: {msg.error.reason}"
        content = msg.content
        if set(content.keys()) != {ARRAYS, METRICS}:
            return None, f"malformed reply: records {sorted(content.keys())}"
        try:
            point = arrays_to_point(content[ARRAYS], self.dim)
        except ValueError as err:
            return None, f"malformed reply: {err}"
        if not float(content[METRICS].get(WEIGHT_KEY, 0)) > 0:
            return None, f"malformed reply: no positive {WEIGHT_KEY!r}"
        return point, None


def _combine(clients: list[dict]) -> dict[str, float]:
    """Costs summed over clients; the losses weighted by examples."""
    if not clients:
        return {}
    weights = [float(c[WEIGHT_KEY]) for c in clients]
    out = {key: float(sum(float(c.get(key, 0)) for c in clients)) for key in _SUMMED}
    for key in ("loss", "last-loss"):
        out[key] = float(sum(w * float(c.get(key, 0.0)) for w, c in zip(weights, clients)) / sum(weights))
    out[WEIGHT_KEY] = float(sum(weights))
    return out
