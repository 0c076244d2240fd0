"""RAPT's client: one call of ``train`` = privatize this round's share of the partition and send it.

The client shuffles its partition once (seeded) and cuts it into ``federation.rounds`` shares; in round r
it privatizes share r (random plain tokens in front of each text, d_chi over every token, with the service
model's embeddings unless ``method.privatize.embedding`` says otherwise) and replies with the privatized ids
(records.py). Every example leaves the client at most once, privatized once, so the per-example d_chi
guarantee is not weakened by repeated noisy copies. Raw text and raw token ids never leave. The user's side
itself is plain Python (``fedprompt.methods.rapt.user``); this module decodes, calls it and encodes the reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Context, Message

from fedprompt.fl.client import ClientRound, PerRun, reply, round_seed
from fedprompt.fl.rapt.records import examples_to_arrays

if TYPE_CHECKING:
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.rapt.user import RAPTUser


@dataclass
class RAPTClientState:
    data: ClientData
    user: RAPTUser  # the method's settings, the privatizer and its tokenizer


def _build(cfg, node_config) -> RAPTClientState:
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.rapt.user import RAPTUser
    from fedprompt.privacy.dchi import load_privatizer

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
