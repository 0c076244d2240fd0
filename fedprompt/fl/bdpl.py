"""BDPL / FedOne on Flower: the message layout, the strategy, the client and the server (the round template's
:class:`~fedprompt.fl.rounds.MethodServer`). The policy-gradient steps are plain Python in fedprompt.methods.bdpl.

Messages. Server -> client: ``"arrays"`` {``"logits"``: float32 (L, V), the global policy, one row of logits per
slot} and ``"config"`` {``"server-round"``}. Client -> server: ``"arrays"`` (its policy after its local steps,
same layout) and ``"metrics"`` (numbers only, :data:`REPLY_METRICS`). Candidate j of every slot is the j-th word
of the run's candidate vocabulary, which the server and every client build the same way from the same tokenizer
(``method.vocab_model``), so only numbers travel. With ``method.optimizer_state=keep`` a client's Adam moments
stay in its ``context.state`` as :data:`OPTIMIZER_STATE` (never sent); everything else a client does is a
function of (seed, round, partition-id).

FedOne (Wang et al. 2025) activates ONE client per round, uniformly at random: the server's policy becomes that
client's locally updated logits. With K > 1 activated clients ("federated BDPL") the new logits are FedAvg's
example-weighted mean of theirs (McMahan et al. 2017; the mean of the parameters the clients optimise).
Round 0 is the uniform policy (all logits 0; its argmax prompt is the first candidate in every slot). The server
scores the argmax prompt through its own black box and saves the final logits (``logits.npy``, with the
candidate words in ``candidates.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedprompt.fl.client import ClientRound, PerRun, reply, usage_metrics
from fedprompt.fl.records import array_record, arrays_to_prompt, prompt_to_arrays
from fedprompt.fl.rounds import MethodServer, Scored, serve
from fedprompt.fl.strategy import FedStrategy
from fedprompt.runs.report import RoundStats

if TYPE_CHECKING:
    from fedprompt.blackbox import BlackBoxLM
    from fedprompt.methods.bdpl.config import BDPLConfig
    from fedprompt.methods.bdpl.search import BDPLClient
    from fedprompt.runs.data import ClientData

LOGITS = "logits"
OPTIMIZER_STATE = "bdpl-optimizer"
LOGITS_FILE = "logits.npy"
CANDIDATES_FILE = "candidates.json"

REPLY_METRICS = (
    "num-examples",      # the client's training examples: FedAvg's weight
    "partition-id",      # which client this is
    "loss",              # mean loss of the sampled prompts over the round's steps
    "local-accuracy",    # accuracy of the sampled prompts' predictions over the round's steps (free: same queries)
    "entropy",           # mean per-slot entropy of the returned policy (log V = uniform)
    "queries",           # examples scored by the black box this round (samples_per_step x batch per step)
    "steps",             # local steps taken
    "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",  # the black box's accounting
    "train-s",           # wall time of the local steps
)


def logits_to_arrays(logits: np.ndarray) -> ArrayRecord:
    return prompt_to_arrays({LOGITS: logits})


def arrays_to_logits(arrays: ArrayRecord, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The (L, V) logits of an ArrayRecord (exactly ``"logits"``, finite); ``shape`` is the one this run expects."""
    return arrays_to_prompt(arrays, {LOGITS: shape or (None, None)})[LOGITS]


def optimizer_to_arrays(m: np.ndarray, v: np.ndarray, t: int) -> ArrayRecord:
    return ArrayRecord({"m": Array(np.asarray(m, dtype=np.float64)), "v": Array(np.asarray(v, dtype=np.float64)),
                        "t": Array(np.array([t], dtype=np.int64))})


def arrays_to_optimizer(arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray, int]:
    return arrays["m"].numpy().copy(), arrays["v"].numpy().copy(), int(arrays["t"].numpy()[0])


class BDPLFedAvg(FedStrategy):
    """FedAvg over the ``"logits"`` array, weighted by ``"num-examples"``, activating ``clients_per_round``
    partitions a round (the shared seeded draw; ``fraction_train`` and ``min_train_clients`` do not apply).
    Replies without logits of the global shape or without a positive example count are refused. ``vocab``
    (optional) lets the round record show each client's argmax prompt.
    """

    kept = "global logits"

    def __init__(self, clients_per_round: int = 1, vocab: Sequence[str] | None = None, **kwargs) -> None:
        kwargs["min_train_nodes"] = clients_per_round
        kwargs.pop("fraction_train", None)
        super().__init__(**kwargs)
        self.clients_per_round = int(clients_per_round)
        self.vocab = list(vocab) if vocab is not None else None
        self._shape: tuple[int, ...] | None = None

    def sample_size(self, available: int) -> int:
        return min(available, self.clients_per_round)

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self._shape = tuple(arrays[LOGITS].shape)

    def invalid(self, msg: Message) -> str | None:
        return self.weighted_layout(msg, lambda arrays: arrays_to_logits(arrays, self._shape))

    def record(self, stats: RoundStats, valid: list[Message]) -> None:
        if self.vocab is not None:
            stats.client_prompts = [" ".join(self.vocab[int(i)] for i in arrays_to_logits(array_record(m.content)).argmax(axis=1))
                                    for m in valid]

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        return aggregate_arrayrecords([m.content for m in valid], self.weighted_by_key)


def vocab_model(cfg) -> str:
    """The tokenizer the candidates come from: ``method.vocab_model``, else the service model (``model.name``)."""
    return str(cfg.method.get("vocab_model") or cfg.model.name)


# --- the client --------------------------------------------------------------------------------------------------


@dataclass
class BDPLClientState:
    method: BDPLConfig
    data: ClientData
    search: BDPLClient  # holds the candidate vocabulary
    blackbox: BlackBoxLM


def _build(cfg, node_config) -> BDPLClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.methods.bdpl import BDPLClient, candidate_vocab
    from fedprompt.models import load_tokenizer
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    vocab = candidate_vocab(load_tokenizer(vocab_model(cfg)), method)
    return BDPLClientState(method, client_data(cfg, node_config), BDPLClient(method, vocab), make_blackbox(cfg))


# A new run in this process first closes the previous run's black-box connections.
CLIENT = PerRun(_build, release=lambda old: old.blackbox.close())


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local BDPL in one round; raises on failure (the ClientApp turns that into an error reply)."""
    from fedprompt.methods.bdpl import Adam

    state = CLIENT.get(context, cfg)
    method, clients = state.method, state.data.partition.clients
    now = ClientRound.of(msg, context, cfg, len(clients))
    logits = arrays_to_logits(array_record(msg.content), state.search.shape)
    optimizer = state.search.make_optimizer()
    kept = optimizer if method.optimizer_state == "keep" and isinstance(optimizer, Adam) else None
    if kept is not None and OPTIMIZER_STATE in context.state:
        kept.m, kept.v, kept.t = arrays_to_optimizer(array_record(context.state, OPTIMIZER_STATE))
    examples = clients[now.partition_id]
    result = state.search.run(state.blackbox, state.data.spec, logits, examples, seed=now.seed, optimizer=optimizer)
    if kept is not None and kept.m is not None and kept.v is not None:  # Adam sets m and v together
        context.state[OPTIMIZER_STATE] = optimizer_to_arrays(kept.m, kept.v, kept.t)
    return reply(msg, logits_to_arrays(result.logits), {  # None (left out): no step (budget)
        "num-examples": len(examples), "partition-id": now.partition_id, "loss": result.mean_loss,
        "local-accuracy": result.sample_accuracy, "entropy": result.entropy, "queries": result.queries,
        "steps": result.steps, **usage_metrics(result.usage), "train-s": result.seconds})


# --- the server --------------------------------------------------------------------------------------------------


def check(cfg, spec) -> dict:
    """BDPL's checks before launch: the candidate vocabulary, K against the federation, the service."""
    from fedprompt.blackbox.scoring import check_service
    from fedprompt.errors import ConfigError
    from fedprompt.methods.bdpl import candidate_vocab
    from fedprompt.models import load_tokenizer
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    fed = cfg.federation
    if method.clients_per_round > int(fed.num_clients):
        raise ConfigError(f"method.clients_per_round={method.clients_per_round} but federation.num_clients="
                          f"{fed.num_clients}; activate at most num_clients clients a round")
    available = int(fed.get("min_available_clients") or fed.num_clients)
    if method.clients_per_round > available:
        raise ConfigError(f"method.clients_per_round={method.clients_per_round} > federation.min_available_clients="
                          f"{available}: a round could find too few clients; raise min_available_clients")
    if int(fed.min_replies) > method.clients_per_round:
        raise ConfigError(f"federation.min_replies={fed.min_replies} but a round activates only "
                          f"method.clients_per_round={method.clients_per_round} clients: every round would be "
                          "skipped; lower min_replies or raise clients_per_round")
    name = vocab_model(cfg)
    vocab = candidate_vocab(load_tokenizer(name), method)  # also converts an embedded model once, before the clients
    check_service(cfg, spec)
    return {"vocab_model": name, "candidates": len(vocab)}


class BDPLServer(MethodServer):
    """Scores the global policy's argmax prompt through the server's own black box."""

    def __init__(self, cfg, method, task, spec, examples) -> None:
        from fedprompt.blackbox import make_blackbox
        from fedprompt.methods.bdpl import BDPLClient, candidate_vocab
        from fedprompt.models import load_tokenizer

        super().__init__(cfg, method, task, spec, examples)
        self.vocab = candidate_vocab(load_tokenizer(vocab_model(cfg)), method)
        self.policy = BDPLClient(method, self.vocab)  # only for the shape and the initial logits; the server runs no steps
        self.blackbox = make_blackbox(cfg)
        self.usage = self.blackbox.usage

    def strategy(self, **common) -> BDPLFedAvg:  # method.clients_per_round clients a round
        return BDPLFedAvg(clients_per_round=self.method.clients_per_round, vocab=self.vocab, **common)

    def info(self) -> dict:
        method = self.method
        return {"variant": "fedone" if method.clients_per_round == 1 else "federated-bdpl",
                "service": str(self.cfg.service.kind), "clients_per_round": method.clients_per_round,
                "prompt_length": method.prompt_length, "candidates": len(self.vocab), "vocab_model": vocab_model(self.cfg),
                "samples_per_step": method.samples_per_step, "local_steps": method.local_steps,
                "batch_size": method.batch_size, "lr": method.lr, "optimizer": method.optimizer,
                "query_budget": method.query_budget}

    def untuned(self, rows, text):
        from fedprompt.blackbox.scoring import predict_prompt

        return predict_prompt(self.blackbox, self.spec, rows, text)

    def initial_arrays(self) -> ArrayRecord:
        return logits_to_arrays(self.policy.initial_logits())

    def score(self, server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        from fedprompt.methods.bdpl import argmax_prompt

        words = [self.vocab[int(i)] for i in argmax_prompt(arrays_to_logits(arrays, self.policy.shape))]
        return Scored(words, self.untuned(self.examples, words) if due else None, len(self.examples))

    def save(self, folder: Path, arrays: ArrayRecord) -> dict:
        np.save(folder / LOGITS_FILE, arrays_to_logits(arrays, self.policy.shape))
        (folder / CANDIDATES_FILE).write_text(json.dumps(self.vocab) + "\n")
        return {"logits_file": str(folder / LOGITS_FILE)}

    def close(self) -> None:
        self.blackbox.close()


def run_server(grid, cfg) -> dict:
    return serve(grid, cfg, BDPLServer)
