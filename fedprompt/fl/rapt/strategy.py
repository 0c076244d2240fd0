"""RAPT as a Flower strategy: FedAvg's sampling and messages, but "aggregation" is service-side training.

Each round, ``configure_train`` (FedAvg's) samples clients and sends them the current soft prompt and the
round number. Each client replies with this round's share of its examples, privatized on the client
(records.py). ``aggregate_train`` checks every reply (error replies and malformed ones are recorded and
skipped), pools the privatized examples with those of earlier rounds in the order of the replies' partition
ids (node ids are random per run: a fixed seed then trains on the same pool in the same order), and trains
the soft prompt and the reconstruction head on the pool for ``method.train.steps`` steps; the new soft
prompt is the round's global ArrayRecord. Fewer than ``min_replies`` valid replies: the round is recorded as
skipped, its examples are not pooled and the prompt is kept. The head never leaves the server and is dropped
at the end; the trainer's whole state (prompt, head, optimizer, sampler RNG, pool) is the strategy's
checkpoint state, so a resumed run trains on exactly what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from fedprompt.fl.fedavg import RecordedFedAvg
from fedprompt.fl.rapt.records import arrays_to_examples, examples_to_arrays, prompt_to_arrays
from fedprompt.fl.records import ARRAYS, METRICS, audit_replies, record_bytes, serialize_content
from fedprompt.fl.report import RoundStats
from fedprompt.fl.rounds import too_few_replies

POOL, TRAINER = "pool", "trainer"  # the checkpoint state's records


def reply_order(msg: Message) -> tuple:
    """Sort key of a reply: its partition id (error replies last, by node), ties by the content's digest; never
    the node id of a valid reply, which is random per run."""
    if msg.has_error():
        return (1, float("inf"), str(int(msg.metadata.src_node_id)))
    metrics = msg.content[METRICS] if METRICS in msg.content else {}
    try:
        pid = float(metrics.get("partition-id", -1))
    except (TypeError, ValueError):
        pid = -1.0
    return (0, pid, hashlib.sha256(serialize_content(msg.content)).hexdigest())


class RAPTStrategy(RecordedFedAvg):
    """RAPT (Li, Tan, Liu 2023) over Flower: clients privatize, the server trains on what they sent."""

    def __init__(self, trainer, *, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, min_replies: int = 1, audit_path: str | Path | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, min_replies=min_replies, audit_path=audit_path)
        self.trainer = trainer

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = list(replies)
        audit_replies(self.audit_path, server_round, replies)
        stats.missing = max(0, stats.sampled - len(replies))
        pooled = len(self.trainer.examples)
        received, sums = 0, {"tokens": 0.0, "unchanged": 0.0}
        for msg in sorted(replies, key=reply_order):
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                stats.failures.append({"node": node, "code": int(msg.error.code), "reason": str(msg.error.reason)})
                log(WARNING, "aggregate_train: node %d failed (%s), skipped", node, msg.error.reason)
                continue
            try:
                examples = arrays_to_examples(msg.content[ARRAYS])
                self.trainer.add(examples)
            except (KeyError, ValueError) as err:  # ConfigError is a ValueError: bad ids, labels, plain tokens
                stats.failures.append({"node": node, "code": -1, "reason": f"malformed reply: {err}"})
                continue
            metrics = msg.content[METRICS] if METRICS in msg.content else {}
            tokens = float(metrics.get("tokens", 0))
            sums["tokens"] += tokens
            sums["unchanged"] += tokens * float(metrics.get("tokens-unchanged", 0.0))
            received += len(examples)
            stats.replies += 1
            stats.bytes_up += record_bytes(msg.content)
        if too_few_replies(stats, stats.replies, self.min_replies, server_round, kept="prompt"):
            del self.trainer.examples[pooled:]  # a skipped round pools nothing: as if its replies never came
        stats.metrics = {"examples-received": float(received), "examples-pooled": float(len(self.trainer.examples)),
                         "tokens-received": sums["tokens"],
                         "tokens-unchanged": sums["unchanged"] / sums["tokens"] if sums["tokens"] else 0.0}
        if stats.skipped or not self.trainer.examples:
            if not stats.skipped:
                log(WARNING, "aggregate_train: no privatized examples yet in round %d; the prompt is kept", server_round)
            stats.train_s = time.perf_counter() - stats.started
            return None, MetricRecord(stats.metrics) if stats.replies else None
        stats.metrics.update({k: float(v) for k, v in self.trainer.train().items()})
        stats.train_s = time.perf_counter() - stats.started
        log(INFO, "aggregate_train: %d examples received, %d pooled; task loss %.4f", received,
            len(self.trainer.examples), stats.metrics["task_loss"])
        return prompt_to_arrays(self.trainer.soft_prompt.weight), MetricRecord(stats.metrics)

    # --- resume: the trainer's state in the checkpoint (fedprompt.fl.checkpoint.CheckpointedRounds) -----------

    def checkpoint_state(self) -> RecordDict:
        state = self.trainer.state()
        examples = state.pop("examples")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        plain = len(examples[0].plain) if examples else 0
        return RecordDict({POOL: examples_to_arrays(examples, plain),
                           TRAINER: ArrayRecord({"state": Array(np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy())})})

    def restore_state(self, state: RecordDict) -> None:
        data = state[TRAINER]["state"].numpy().tobytes()
        trainer_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        trainer_state["examples"] = arrays_to_examples(state[POOL])
        self.trainer.load_state(trainer_state)
