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
from typing import TYPE_CHECKING

from flwr.app import Context, Message

from fedprompt.fl.bdpl.records import (
    OPTIMIZER_STATE,
    arrays_to_logits,
    arrays_to_optimizer,
    logits_to_arrays,
    optimizer_to_arrays,
)
from fedprompt.fl.client import ClientRound, PerRun, reply, usage_metrics
from fedprompt.fl.records import ARRAYS

if TYPE_CHECKING:
    from fedprompt.blackbox import BlackBoxLM
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.bdpl import BDPLClient, BDPLConfig


@dataclass
class BDPLClientState:
    method: BDPLConfig
    data: ClientData
    search: BDPLClient  # holds the candidate vocabulary
    blackbox: BlackBoxLM


def vocab_model(cfg) -> str:
    """The tokenizer the candidates come from: ``method.vocab_model``, else the service model (``model.name``)."""
    return str(cfg.method.get("vocab_model") or cfg.model.name)


def _build(cfg, node_config) -> BDPLClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.bdpl import BDPLClient, candidate_vocab
    from fedprompt.models import load_tokenizer

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
    logits = arrays_to_logits(msg.content[ARRAYS], state.search.shape)
    optimizer = state.search.make_optimizer()
    keep = method.optimizer_state == "keep" and isinstance(optimizer, Adam)
    if keep and OPTIMIZER_STATE in context.state:
        optimizer.m, optimizer.v, optimizer.t = arrays_to_optimizer(context.state[OPTIMIZER_STATE])
    examples = clients[now.partition_id]
    result = state.search.run(state.blackbox, state.data.spec, logits, examples,
                              seed=now.seed, optimizer=optimizer)
    if keep and optimizer.m is not None:
        context.state[OPTIMIZER_STATE] = optimizer_to_arrays(optimizer.m, optimizer.v, optimizer.t)
    return reply(msg, logits_to_arrays(result.logits), {  # None (left out): no step (budget)
        "num-examples": len(examples), "partition-id": now.partition_id, "loss": result.mean_loss,
        "local-accuracy": result.sample_accuracy, "entropy": result.entropy, "queries": result.queries,
        "steps": result.steps, **usage_metrics(result.usage), "train-s": result.seconds})
