"""RAPT as a Flower strategy: the shared sampling and messages, but "aggregation" is service-side training.

Each round the shared strategy (fedprompt.fl.strategy) samples clients and sends them the current soft prompt
and the round number. Each client replies with this round's share of its examples, privatized on the client
(records.py). Accepting a reply pools its privatized examples with those of earlier rounds, in the order of the
replies' partition ids (node ids are random per run: a fixed seed then trains on the same pool in the same
order); replies the trainer refuses are recorded as failures. The aggregation trains
the soft prompt and the reconstruction head on the pool for ``method.train.steps`` steps; the new soft
prompt is the round's global ArrayRecord. Fewer than ``min_replies`` valid replies: the round is recorded as
skipped, its examples are not pooled and the prompt is kept. The head never leaves the server and is dropped
at the end; the trainer's whole state (prompt, head, optimizer, sampler RNG, pool) is the strategy's
checkpoint state, so a resumed run trains on exactly what the uninterrupted one did.
"""

from __future__ import annotations

import io
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore import log

from fedprompt.fl.rapt.records import SOFT_PROMPT, arrays_to_examples, examples_to_arrays
from fedprompt.fl.records import ARRAYS, prompt_to_arrays
from fedprompt.fl.strategy import FedStrategy

POOL, TRAINER = "pool", "trainer"  # the checkpoint state's records


class RAPTStrategy(FedStrategy):
    """RAPT (Li, Tan, Liu 2023) over Flower: clients privatize, the server trains on what they sent."""

    kept = "prompt"

    def __init__(self, trainer, **kwargs) -> None:
        super().__init__(train_metrics_aggr_fn=self.combine, **kwargs)
        self.trainer = trainer
        self._pooled = self._received = 0  # the pool's size before this round's replies; the examples they brought

    def aggregate_train(self, server_round: int, replies):
        self._pooled, self._received = len(self.trainer.examples), 0
        return super().aggregate_train(server_round, replies)

    def invalid(self, msg: Message) -> str | None:
        try:  # accepting a reply pools its examples (the trainer checks them first)
            examples = arrays_to_examples(msg.content[ARRAYS])
            self.trainer.add(examples)
        except (KeyError, ValueError) as err:  # ConfigError is a ValueError: bad ids, labels, plain tokens
            return f"malformed reply: {err}"
        self._received += len(examples)
        return None

    def discard(self, server_round: int, valid: list[Message]) -> None:
        del self.trainer.examples[self._pooled:]  # a skipped round pools nothing: as if its replies never came

    def combine(self, clients: list[dict], weighted_by_key: str) -> dict[str, float]:
        """Examples received and pooled, tokens received, and the fraction of them the noise left unchanged."""
        tokens = [float(c.get("tokens", 0)) for c in clients]
        unchanged = sum(t * float(c.get("tokens-unchanged", 0.0)) for t, c in zip(tokens, clients))
        return {"examples-received": float(self._received),
                "examples-pooled": float(len(self.trainer.examples)), "tokens-received": sum(tokens),
                "tokens-unchanged": unchanged / sum(tokens) if sum(tokens) else 0.0}

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord | None:
        stats = self.rounds[server_round]
        if not self.trainer.examples:
            log(WARNING, "aggregate_train: no privatized examples yet in round %d; the prompt is kept", server_round)
            return None
        stats.metrics.update({k: float(v) for k, v in self.trainer.train().items()})
        log(INFO, "aggregate_train: %d examples received, %d pooled; task loss %.4f", stats.metrics["examples-received"],
            len(self.trainer.examples), stats.metrics["task_loss"])
        return prompt_to_arrays({SOFT_PROMPT: self.trainer.soft_prompt.weight})

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
