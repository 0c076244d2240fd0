"""FedDTPT as a Flower Message-API strategy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedprompt.fl.feddtpt.records import arrays_to_prompt, prompt_to_arrays
from fedprompt.fl.records import ARRAYS, CONFIG, METRICS, audit_replies, record_bytes
from fedprompt.fl.report import RoundStats


class FedDTPTStrategy(Strategy):
    """FedDTPT (Wu et al. 2024, arXiv 2411.00985): federated discrete prompt search.

    Each round:

    1. ``configure_train``: wait until ``min_available_nodes`` SuperNodes are connected, sample
       ``max(ceil(fraction_train * N), min_train_nodes)`` of them (seeded by ``seed`` and the round) and
       send each the global prompt (``ArrayRecord`` "arrays") and ``ConfigRecord`` "config" with
       ``server-round``.
    2. Each ClientApp edits the prompt word by word against the black-box LLM on its own data and replies
       with its prompt (same ``ArrayRecord`` layout) and a ``MetricRecord`` "metrics".
    3. ``aggregate_train``: replies with errors, undecodable bytes (not UTF-8) or more than ``max_tokens``
       words are recorded as failures and skipped; the valid replies' prompts, ordered by their text (node
       ids are random per run), go to ``FedDTPTAggregator.aggregate`` (attention filter, DBSCAN at the knee
       eps, one word per cluster, original order), whose prompt becomes the new global ``ArrayRecord``.
       Fewer than ``min_replies`` valid replies (failed clients, clients that missed the round's timeout,
       lost nodes), or a single one when several clients were sampled: the round is recorded as skipped
       and the global prompt is kept.
    4. With ``server_check`` (off in the paper): ``server_check(old, merged)`` scores both prompts (the
       server's public pool through the black box) and returns ``{"kept": bool, ...}``; a merged prompt
       that is not kept is recorded and the global prompt stays, the clients' own acceptance rule
       ("keep an edit if accuracy does not drop") applied to the merge.

    There is no federated evaluation; pass ``evaluate_fn`` to ``start`` to score the global prompt
    centrally. Per-round sizes, failures and the aggregation's details are kept in ``self.rounds``.
    With ``audit_path`` every reply is appended there as received (``fedprompt.fl.records.audit_replies``).
    """

    def __init__(
        self,
        aggregator,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        min_replies: int = 1,
        max_tokens: int | None = None,
        seed: int = 0,
        wait_for_nodes_s: float = 300.0,
        audit_path: str | Path | None = None,
        server_check: Callable[[list[str], list[str]], dict[str, Any]] | None = None,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        self.aggregator = aggregator
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.min_replies = min_replies
        self.max_tokens = max_tokens  # longer replies are refused (method.search.max_tokens: no client may send more)
        self.seed = seed
        self.wait_for_nodes_s = wait_for_nodes_s
        self.audit_path = Path(audit_path) if audit_path else None
        self.server_check = server_check
        self._global: list[str] | None = None  # the prompt this round's clients started from
        self.rounds: dict[int, RoundStats] = {}
        self._sent: list[Message] = []  # this round's messages; the Grid sets their ids when it sends them

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction %.2f, at least %d of %d+ nodes, seed %d", self.fraction_train,
            self.min_train_nodes, self.min_available_nodes, self.seed)
        log(INFO, "\t└──> Aggregation: %s", getattr(getattr(self.aggregator, "config", None), "mode", "?"))

    def _sample(self, server_round: int, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.min_available_nodes} SuperNodes connected after "
                                   f"{self.wait_for_nodes_s:.0f} s; a simulation needs --federation-config "
                                   f"num-supernodes={self.min_available_nodes} (fedprompt run sets it)")
            time.sleep(0.5)
        size = min(len(nodes), max(math.ceil(self.fraction_train * len(nodes)), self.min_train_nodes))
        rng = np.random.default_rng([self.seed, server_round])
        # Indices, not ids: node ids are 64-bit unsigned and numpy would turn large ones into floats.
        return sorted(nodes[i] for i in rng.choice(len(nodes), size=size, replace=False))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.started = time.perf_counter()
        nodes = self._sample(server_round, grid)
        config["server-round"] = server_round
        self._global = arrays_to_prompt(arrays)
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        stats.nodes, stats.sampled, stats.bytes_down = nodes, len(nodes), record_bytes(content) * len(nodes)
        log(INFO, "configure_train: sampled %d of %d nodes", len(nodes), len(list(grid.get_node_ids())))
        self._sent = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
        return self._sent

    def _sender(self, reply: Message) -> int:
        """The sampled node a reply answers for: Flower's own error replies (a lost node) come from the SuperLink."""
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent}
        return sent.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = sorted(replies, key=self._sender)
        stats.missing = max(0, stats.sampled - len(replies))
        for node in sorted(set(stats.nodes) - {self._sender(m) for m in replies}):  # the round's timeout passed first
            stats.failures.append({"node": node, "code": None, "reason": "no reply within federation.round_timeout_s"})
        audit_replies(self.audit_path, server_round, replies, node_of=self._sender)
        prompts, metrics = [], []
        for msg in replies:
            if msg.has_error():
                stats.failures.append({"node": self._sender(msg), "code": int(msg.error.code),
                                       "reason": str(msg.error.reason)})
                log(WARNING, "aggregate_train: node %d failed (%s), skipped", self._sender(msg), msg.error.reason)
                continue
            try:
                prompt = arrays_to_prompt(msg.content[ARRAYS])
            except (KeyError, ValueError, UnicodeDecodeError) as err:  # UnicodeDecodeError: non-UTF-8 bytes
                stats.failures.append({"node": self._sender(msg), "code": -1, "reason": f"malformed reply: {err}"})
                log(WARNING, "aggregate_train: node %d sent a malformed reply (%s), skipped", self._sender(msg), err)
                continue
            if self.max_tokens is not None and len(prompt) > self.max_tokens:
                reason = f"prompt of {len(prompt)} words > method.search.max_tokens={self.max_tokens}"
                stats.failures.append({"node": self._sender(msg), "code": -1, "reason": reason})
                log(WARNING, "aggregate_train: node %d sent a %s, skipped", self._sender(msg), reason)
                continue
            prompts.append(prompt)
            metrics.append(dict(msg.content[METRICS]) if METRICS in msg.content else {})
            stats.bytes_up += record_bytes(msg.content)
        # Node ids are random per run; ordering by prompt text makes the aggregator's tie-breaks (lowest
        # client index) reproducible for the same seed, whichever ids Flower drew.
        order = sorted(range(len(prompts)), key=lambda i: " ".join(prompts[i]))
        prompts, metrics = [prompts[i] for i in order], [metrics[i] for i in order]
        stats.replies = len(prompts)
        stats.client_prompts = [" ".join(p) for p in prompts]
        if len(prompts) < self.min_replies or (len(prompts) == 1 and stats.sampled > 1):
            stats.skipped = (f"{len(prompts)} valid replies < federation.min_replies={self.min_replies}"
                             if len(prompts) < self.min_replies else
                             f"1 valid reply of {stats.sampled} sampled: one client is no consensus")
            log(WARNING, "aggregate_train: round %d skipped (%s); the global prompt is kept", server_round, stats.skipped)
            stats.train_s = time.perf_counter() - stats.started
            return None, None
        result = self.aggregator.aggregate(prompts)
        stats.aggregation = {k: v for k, v in result.to_dict().items() if k not in ("weights", "labels")}
        stats.metrics = _combine(metrics)
        merged = result.prompt
        if self.server_check is not None and self._global is not None and merged != self._global:
            verdict = dict(self.server_check(self._global, merged))
            stats.aggregation["server_check"] = verdict
            if not verdict["kept"]:
                log(INFO, "aggregate_train: merged prompt %r scored below the global prompt on the server's "
                    "public pool (%s); the global prompt is kept", result.text, verdict)
                merged = self._global
        stats.train_s = time.perf_counter() - stats.started
        log(INFO, "aggregate_train: %d prompts -> %r", len(prompts), " ".join(merged))
        return prompt_to_arrays(merged), MetricRecord(stats.metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the global prompt is evaluated centrally (evaluate_fn), not on the clients

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _combine(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Costs are summed over clients, accuracies and times averaged (each over the clients reporting them)."""
    out: dict[str, float] = {}
    for key in sorted({k for m in metrics for k in m}):
        values = [float(m[key]) for m in metrics if key in m]
        summed = key in ("queries", "steps") or key.startswith("bb-")
        out[key] = float(sum(values)) if summed else float(np.mean(values))
    return out
