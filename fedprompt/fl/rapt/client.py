"""RAPT's client: one call of ``train`` = privatize this round's share of the partition and send it.

The client shuffles its partition once (seeded) and cuts it into ``federation.rounds`` shares; in round r
it privatizes share r (random plain tokens in front of each text, d_chi over every token, with the service
model's embeddings unless ``method.privatize.embedding`` says otherwise) and replies with the privatized ids
(records.py). Every example leaves the client at most once, privatized once, so the per-example d_chi
guarantee is not weakened by repeated noisy copies. Raw text and raw token ids never leave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message

from fedprompt.fl.client import ClientRound, PerRun, reply, round_seed
from fedprompt.fl.rapt.records import examples_to_arrays

if TYPE_CHECKING:
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.rapt import RAPTConfig
    from fedprompt.privacy.dchi import DChiPrivatizer


@dataclass
class RAPTClientState:
    method: RAPTConfig
    data: ClientData
    privatizer: DChiPrivatizer
    tokenizer: Any


def _build(cfg, node_config) -> RAPTClientState:
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.privacy.dchi import load_privatizer

    method = method_config(cfg)
    privatizer, tokenizer = load_privatizer(method.privatize, str(cfg.model.name))
    return RAPTClientState(method, client_data(cfg, node_config), privatizer, tokenizer)


CLIENT = PerRun(_build)


def round_share(examples: list, rounds: int, server_round: int, seed: int) -> list:
    """Share ``server_round`` (1-based) of ``rounds`` of a seeded shuffle of ``examples`` (empty after the last)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    shares = np.array_split(order, rounds)
    return [examples[i] for i in shares[server_round - 1]] if server_round <= rounds else []


def train(msg: Message, context: Context, cfg) -> Message:
    """Privatize and send this round's share; raises on failure (the ClientApp turns that into an error reply)."""
    from fedprompt.methods.rapt import privatize_examples

    state = CLIENT.get(context, cfg)
    method, data = state.method, state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    # round 0's seed: the client's one shuffle of its partition for the whole run
    share = round_share(data.partition.clients[now.partition_id], int(cfg.federation.rounds), now.server_round,
                        round_seed(int(cfg.seed), 0, now.partition_id))
    start = time.perf_counter()
    private, raw = privatize_examples(share, state.tokenizer, state.privatizer, method.train.max_text_tokens,
                                      seed=now.seed, plain_tokens=method.plain_tokens,
                                      plain_vocab=method.reconstruction.plain_vocab)
    m, n = method.plain_tokens, len(private)
    # Text tokens as sent and as they were (texts, then pairs: privatize_examples' order), plain tokens left out.
    sent = [t for e in private for t in e.ids[m:]] + [t for e in private for t in (e.pair_ids or ())]
    before = [t for r in raw[:n] for t in r[m:]] + [t for r in raw[n:] for t in r]
    return reply(msg, examples_to_arrays(private, m), {
        "num-examples": n, "tokens": len(sent), "privatize-s": time.perf_counter() - start,
        "tokens-unchanged": float(np.mean(np.asarray(sent) == np.asarray(before))) if sent else 0.0,
        "partition-id": now.partition_id})
