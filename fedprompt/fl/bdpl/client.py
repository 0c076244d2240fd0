"""BDPL's client: one call of ``train`` = one activated client's local BDPL steps in one round.

The client receives the global logits, runs ``method.local_steps`` variance-reduced policy-gradient
steps against the black box (``service.kind``) on its own partition, and replies with its logits and
numbers (records.py). Its examples, labels, sampled prompts and losses stay here. With
``method.optimizer_state=keep`` its Adam moments are kept in ``context.state`` (Flower keeps it per node
for the whole run; the ClientApp saves it to disk for resume); everything else is a function of
(seed, round, partition-id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedprompt.fl.bdpl.records import (
    OPTIMIZER_STATE,
    arrays_to_logits,
    arrays_to_optimizer,
    logits_to_arrays,
    optimizer_to_arrays,
)
from fedprompt.fl.records import ARRAYS, CONFIG, METRICS


@dataclass
class ClientState:
    """What a client process builds once per run and reuses every round (Ray keeps its actors alive)."""

    method: Any  # BDPLConfig
    data: Any  # fedprompt.fl.data.ClientData
    search: Any  # BDPLClient (holds the candidate vocabulary)
    blackbox: Any  # BlackBoxLM


_STATE: dict[str, ClientState] = {}


def vocab_model(cfg) -> str:
    """The tokenizer the candidates come from: ``method.vocab_model``, else the service model (``model.name``)."""
    return str(cfg.method.get("vocab_model") or cfg.model.name)


def client_state(run_config, cfg) -> ClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.fl.config import method_config, once_per_run
    from fedprompt.fl.data import client_data
    from fedprompt.methods.bdpl import BDPLClient, candidate_vocab
    from fedprompt.models import load_tokenizer

    def build() -> ClientState:
        method = method_config(cfg)
        vocab = candidate_vocab(load_tokenizer(vocab_model(cfg)), method)
        return ClientState(method, client_data(cfg), BDPLClient(method, vocab), make_blackbox(cfg))

    # A new run in this process first closes the previous run's black-box connections.
    return once_per_run(_STATE, run_config, build, release=lambda old: old.blackbox.close())


def _seed(base: int, server_round: int, partition_id: int) -> int:
    # Distinct per client and round, reproducible for a given run seed (batches and sampled prompts).
    return (int(base) * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local BDPL in one round; raises on failure (the ClientApp turns that into an error reply)."""
    from fedprompt.methods.bdpl import Adam

    state = client_state(context.run_config, cfg)
    method, clients = state.method, state.data.partition.clients
    partition_id = int(context.node_config["partition-id"])
    if int(context.node_config["num-partitions"]) != len(clients):
        raise RuntimeError(f"{context.node_config['num-partitions']} SuperNodes but federation.num_clients={len(clients)}")
    server_round = int(msg.content[CONFIG]["server-round"])
    logits = arrays_to_logits(msg.content[ARRAYS], state.search.shape)
    optimizer = state.search.make_optimizer()
    keep = method.optimizer_state == "keep" and isinstance(optimizer, Adam)
    if keep and OPTIMIZER_STATE in context.state:
        optimizer.m, optimizer.v, optimizer.t = arrays_to_optimizer(context.state[OPTIMIZER_STATE])
    examples = clients[partition_id]
    result = state.search.run(state.blackbox, state.data.spec, logits, examples,
                              seed=_seed(cfg.seed, server_round, partition_id), optimizer=optimizer)
    if keep and optimizer.m is not None:
        context.state[OPTIMIZER_STATE] = optimizer_to_arrays(optimizer.m, optimizer.v, optimizer.t)
    usage = result.usage
    metrics = {
        "num-examples": len(examples), "partition-id": partition_id, "loss": result.mean_loss,
        "local-accuracy": result.sample_accuracy, "entropy": result.entropy, "queries": result.queries,
        "steps": result.steps, "bb-requests": usage.requests, "bb-prompt-tokens": usage.prompt_tokens,
        "bb-bytes-sent": usage.bytes_sent, "bb-bytes-received": usage.bytes_received, "train-s": result.seconds,
    }
    content = RecordDict({
        ARRAYS: logits_to_arrays(result.logits),
        METRICS: MetricRecord({k: v for k, v in metrics.items() if v is not None}),  # None: no step (budget)
    })
    return Message(content, reply_to=msg)
