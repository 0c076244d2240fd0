"""Flower's FedAvg with the per-round record a run report needs: the base of FedAvg-derived strategies."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedprompt.fl.records import record_bytes
from fedprompt.fl.report import RoundStats


class RecordedFedAvg(FedAvg):
    """``FedAvg`` that keeps ``self.rounds[r]``, round r's :class:`RoundStats`.

    ``configure_train`` (FedAvg's sampling and messages) records when the round started, how many clients
    were sampled and the bytes sent to them; a subclass's ``aggregate_train`` records the replies' side, and
    first hands them to ``fedprompt.fl.records.audit_replies(self.audit_path, ...)`` (``audit_path``: where
    ``federation.audit_replies`` appends every reply as received; None, the default, writes nothing).
    ``min_replies`` (``federation.min_replies``) is the valid replies a subclass's round needs: with fewer it
    records the round as skipped and keeps the global arrays (``fedprompt.fl.rounds.too_few_replies``).
    """

    def __init__(self, audit_path: str | Path | None = None, min_replies: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_replies = int(min_replies)
        self.rounds: dict[int, RoundStats] = {}
        self.audit_path = Path(audit_path) if audit_path else None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.started = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        stats.sampled = len(messages)
        stats.bytes_down = sum(record_bytes(m.content) for m in messages)
        return messages
