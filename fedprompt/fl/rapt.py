"""RAPT on Flower: the message layout, the strategy (whose "aggregation" is service-side training), the client
and the server (the round template's :class:`~fedprompt.fl.rounds.MethodServer`). The user's side and the
trainer are plain Python in fedprompt.methods.rapt.

Messages. Server -> client: ``"arrays"`` {``"soft-prompt"``: float32 (tokens, hidden), the current prompt; clients
need not use it} and ``"config"`` {``"server-round"``}. Client -> server: this round's share of the client's
examples, privatized on the client::

    "arrays": ArrayRecord {
        "ids":          int32 (total,)      privatized [plain tokens + text tokens] of every example, concatenated
        "lengths":      int32 (n,)          ids per example
        "labels":       int32 (n,)
        "plain":        int32 (n, m)        the plain tokens in clear (random public tokens: the reconstruction targets)
        "pair-ids":     int32 (total_pair,) privatized text_pair tokens (pair tasks; empty otherwise)
        "pair-lengths": int32 (n or 0,)
    }
    "metrics": MetricRecord {"num-examples", "tokens", "tokens-unchanged", "privatize-s", "partition-id"}

Nothing else leaves a client: no raw text, no raw token ids. ``tokens-unchanged`` is the fraction of the client's
text tokens the noise left as they were (what nearest-neighbour inversion recovers), an aggregate.

The client shuffles its partition once (seeded) and cuts it into ``federation.rounds`` shares; in round r it
privatizes share r, so every example leaves the client at most once, privatized once. The server pools the
valid replies' examples in partition order (node ids are random per run) and trains the soft prompt and the
reconstruction head on the pool for ``method.train.steps`` steps; a skipped round pools nothing. The trainer's
whole state (prompt, head, optimizer, sampler RNG, pool) is the strategy's checkpoint state, so a resumed run
trains on exactly what the uninterrupted one did. The evaluation split is privatized as users would privatize a
query (one fixed seed: every round is scored on the same privatized set). The head never leaves the server and
is dropped at the end: ``soft_prompt.pt`` is the product.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore import log

from fedprompt.fl.client import ClientRound, PerRun, reply, round_seed
from fedprompt.fl.records import array_record, arrays_to_prompt, prompt_to_arrays
from fedprompt.fl.rounds import MethodServer, Scored, serve
from fedprompt.fl.strategy import FedStrategy
from fedprompt.methods.rapt.inputs import PrivateExample

if TYPE_CHECKING:
    from fedprompt.methods.rapt.user import RAPTUser
    from fedprompt.runs.data import ClientData

SOFT_PROMPT = "soft-prompt"
DATA_KEYS = ("ids", "lengths", "labels", "plain", "pair-ids", "pair-lengths")
REPLY_METRICS = ("num-examples", "tokens", "tokens-unchanged", "privatize-s", "partition-id")
POOL, TRAINER = "pool", "trainer"  # the checkpoint state's records


def examples_to_arrays(examples: Sequence[PrivateExample], plain_tokens: int) -> ArrayRecord:
    pairs = [e.pair_ids for e in examples if e.pair_ids is not None]
    if pairs and len(pairs) != len(examples):
        raise ValueError("either every example of a reply has a text_pair or none has")

    def ints(values) -> Array:
        return Array(np.asarray(values, dtype=np.int32))

    return ArrayRecord({
        "ids": ints([t for e in examples for t in e.ids]),
        "lengths": ints([len(e.ids) for e in examples]),
        "labels": ints([e.label for e in examples]),
        "plain": ints(np.asarray([e.plain for e in examples], dtype=np.int32).reshape(len(examples), plain_tokens)),
        "pair-ids": ints([t for p in pairs for t in p]),
        "pair-lengths": ints([len(p) for p in pairs]),
    })


def arrays_to_examples(arrays: ArrayRecord) -> list[PrivateExample]:
    """The privatized examples of a reply; raises ValueError on a malformed one."""
    missing = sorted(set(DATA_KEYS) - set(arrays.keys()))
    if missing:
        raise ValueError(f"reply lacks arrays {missing}")
    get = {key: arrays[key].numpy().astype(np.int64) for key in DATA_KEYS}
    lengths, labels, plain = get["lengths"], get["labels"], get["plain"]
    n = lengths.size
    if labels.size != n or plain.shape[0] != n or int(lengths.sum()) != get["ids"].size or (lengths < 0).any():
        raise ValueError("reply arrays disagree on the number of examples or tokens")
    pair_lengths = get["pair-lengths"]
    if pair_lengths.size not in (0, n) or int(pair_lengths.sum()) != get["pair-ids"].size:
        raise ValueError("reply pair arrays disagree with the examples")
    ids = np.split(get["ids"], np.cumsum(lengths)[:-1]) if n else []
    pair_ids = np.split(get["pair-ids"], np.cumsum(pair_lengths)[:-1]) if pair_lengths.size else [None] * n
    return [PrivateExample(tuple(i.tolist()), int(y), None if p is None else tuple(p.tolist()), tuple(k.tolist()))
            for i, y, p, k in zip(ids, labels, pair_ids, plain)]


class RAPTStrategy(FedStrategy):
    """RAPT (Li, Tan, Liu 2023) over Flower: clients privatize, the server trains on what they sent. Accepting a
    reply pools its examples (the trainer checks them first; refused ones are failures)."""

    kept = "prompt"

    def __init__(self, trainer, **kwargs) -> None:
        super().__init__(train_metrics_aggr_fn=self.combine, **kwargs)
        self.trainer = trainer
        self._pooled = self._received = 0  # the pool's size before this round's replies; the examples they brought

    def aggregate_train(self, server_round: int, replies):
        self._pooled, self._received = len(self.trainer.examples), 0
        return super().aggregate_train(server_round, replies)

    def invalid(self, msg: Message) -> str | None:
        try:
            examples = arrays_to_examples(array_record(msg.content))
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

    def checkpoint_state(self) -> RecordDict:  # resume: the trainer's whole state
        state = self.trainer.state()
        examples = state.pop("examples")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        plain = len(examples[0].plain) if examples else 0
        return RecordDict({POOL: examples_to_arrays(examples, plain),
                           TRAINER: ArrayRecord({"state": Array(np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy())})})

    def restore_state(self, state: RecordDict) -> None:
        data = array_record(state, TRAINER)["state"].numpy().tobytes()
        trainer_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        trainer_state["examples"] = arrays_to_examples(array_record(state, POOL))
        self.trainer.load_state(trainer_state)


# --- the client --------------------------------------------------------------------------------------------------


@dataclass
class RAPTClientState:
    data: ClientData
    user: RAPTUser  # the method's settings, the privatizer and its tokenizer


def _build(cfg, node_config) -> RAPTClientState:
    from fedprompt.methods.rapt.user import RAPTUser
    from fedprompt.privacy.dchi import load_privatizer
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    privatizer, tokenizer = load_privatizer(method.privatize, str(cfg.model.name))
    return RAPTClientState(client_data(cfg, node_config), RAPTUser(method, tokenizer, privatizer))


CLIENT = PerRun(_build)


def train(msg: Message, context: Context, cfg) -> Message:
    """Privatize and send this round's share; raises on failure (the ClientApp turns that into an error reply)."""
    state = CLIENT.get(context, cfg)
    data = state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    start = time.perf_counter()
    # round 0's seed: the client's one shuffle of its partition for the whole run
    sent = state.user.send(data.partition.clients[now.partition_id], int(cfg.federation.rounds), now.server_round,
                           shuffle_seed=round_seed(int(cfg.seed), 0, now.partition_id), seed=now.seed)
    return reply(msg, examples_to_arrays(sent.examples, state.user.method.plain_tokens), {
        "num-examples": len(sent.examples), "tokens": sent.tokens, "privatize-s": time.perf_counter() - start,
        "tokens-unchanged": sent.tokens_unchanged, "partition-id": now.partition_id})


# --- the server (the service) ------------------------------------------------------------------------------------


def check(cfg, spec) -> dict:
    """RAPT's checks before launch: label words, the privatizer's tokenizer, the model converted once."""
    from fedprompt.errors import ConfigError
    from fedprompt.methods.rapt import first_label_tokens
    from fedprompt.models import load_tokenizer
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    tokenizer = load_tokenizer(str(cfg.model.name))  # also converts an embedded model once, before the clients start
    first_label_tokens(tokenizer, spec.label_words)
    if method.privatize.embedding and method.privatize.embedding != str(cfg.model.name):
        if load_tokenizer(method.privatize.embedding).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"method.privatize.embedding={method.privatize.embedding!r} has another tokenizer than "
                              f"model={cfg.model.name!r}; RAPT sends token ids, so both must share one vocabulary")
    return {"eta": method.privatize.eta}


class RAPTServer(MethodServer):
    """The service model, loaded once; the evaluation queries (and the references') privatized as users would."""

    def __init__(self, cfg, method, task, spec, examples) -> None:
        from fedprompt.methods.rapt import RAPTTrainer
        from fedprompt.methods.rapt.user import RAPTUser
        from fedprompt.models import SoftPrompt, load_causal_lm, load_tokenizer
        from fedprompt.privacy.dchi import load_privatizer

        super().__init__(cfg, method, task, spec, examples)
        name = str(cfg.model.name)
        tokenizer = load_tokenizer(name)
        self.privatizer, _ = load_privatizer(method.privatize, name)
        self.trainer = RAPTTrainer(load_causal_lm(name, cfg.model.get("device"), cfg.model.get("dtype")), tokenizer,
                                   spec, method, seed=int(cfg.seed))
        self.user = RAPTUser(method, tokenizer, self.privatizer)
        self.queries = self.user.privatize(examples, int(cfg.seed) + 7)[0]
        self.private = {id(examples): self.queries}  # validation's privatized copy is added when first asked for
        self.prompt = SoftPrompt(method.prompt.num_tokens, self.trainer.soft_prompt.weight.shape[1]).to(self.trainer.device)
        self.shapes = {SOFT_PROMPT: tuple(self.prompt.weight.shape)}

    def strategy(self, **common) -> RAPTStrategy:
        return RAPTStrategy(self.trainer, **common)

    def info(self) -> dict:
        method = self.method
        return {"eta": method.privatize.eta, "expected_noise_norm": self.privatizer.expected_noise_norm(),
                "reconstruction": method.reconstruction.enabled, "plain_tokens": method.plain_tokens,
                "prompt_tokens": method.prompt.num_tokens, "steps_per_round": method.train.steps}

    def untuned(self, rows, text):  # the untuned prompts on the same privatized queries (validation: privatized alike)
        if id(rows) not in self.private:
            self.private[id(rows)] = self.user.privatize(rows, int(self.cfg.seed) + 8)[0]
        return self.trainer.predict(self.private[id(rows)], untuned=text)

    def initial_arrays(self) -> ArrayRecord:
        return prompt_to_arrays({SOFT_PROMPT: self.trainer.soft_prompt.weight})

    def score(self, server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        if not due:
            return Scored()
        with torch.no_grad():
            self.prompt.weight.copy_(torch.from_numpy(arrays_to_prompt(arrays, self.shapes)[SOFT_PROMPT]))
        return Scored(predictions=self.trainer.predict(self.queries, self.prompt))

    def save(self, folder: Path, arrays: ArrayRecord) -> dict:
        torch.save(torch.from_numpy(arrays_to_prompt(arrays, self.shapes)[SOFT_PROMPT]), folder / "soft_prompt.pt")
        return {"examples_received": len(self.trainer.examples), "train_steps": self.trainer.steps_done,
                "soft_prompt": str(folder / "soft_prompt.pt")}


def run_server(grid, cfg) -> dict:
    return serve(grid, cfg, RAPTServer)
