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
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedprompt.fl.rapt.records import examples_to_arrays
from fedprompt.fl.records import ARRAYS, CONFIG, METRICS


@dataclass
class ClientState:
    """What a client process loads once and reuses every round (Ray keeps its actors alive)."""

    cfg: Any
    method: Any  # RAPTConfig
    data: Any  # fedprompt.fl.data.ClientData
    privatizer: Any  # DChiPrivatizer
    tokenizer: Any


_STATE: dict[str, ClientState] = {}


def client_state(run_config, cfg) -> ClientState:
    from fedprompt.fl.config import method_config, once_per_run
    from fedprompt.fl.data import client_data
    from fedprompt.privacy.dchi import load_privatizer

    def build() -> ClientState:
        method = method_config(cfg)
        privatizer, tokenizer = load_privatizer(method.privatize, str(cfg.model.name))
        return ClientState(cfg, method, client_data(cfg), privatizer, tokenizer)

    return once_per_run(_STATE, run_config, build)


def round_share(examples: list, rounds: int, server_round: int, seed: int) -> list:
    """Share ``server_round`` (1-based) of ``rounds`` of a seeded shuffle of ``examples`` (empty after the last)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    shares = np.array_split(order, rounds)
    return [examples[i] for i in shares[server_round - 1]] if server_round <= rounds else []


def train(msg: Message, context: Context, cfg) -> Message:
    """Privatize and send this round's share; raises on failure (the ClientApp turns that into an error reply)."""
    from fedprompt.methods.rapt import privatize_examples

    state = client_state(context.run_config, cfg)
    method, data = state.method, state.data
    partition_id = int(context.node_config["partition-id"])
    if int(context.node_config["num-partitions"]) != len(data.partition.clients):
        raise RuntimeError(f"{context.node_config['num-partitions']} SuperNodes but federation.num_clients="
                           f"{len(data.partition.clients)}")
    server_round = int(msg.content[CONFIG]["server-round"])
    base = int(state.cfg.seed) * 1_000_003 + partition_id
    share = round_share(data.partition.clients[partition_id], int(state.cfg.federation.rounds), server_round, base)
    start = time.perf_counter()
    private, raw = privatize_examples(share, state.tokenizer, state.privatizer, method.train.max_text_tokens,
                                      seed=(base * 10_007 + server_round) % 2**63, plain_tokens=method.plain_tokens,
                                      plain_vocab=method.reconstruction.plain_vocab)
    m, n = method.plain_tokens, len(private)
    # Text tokens as sent and as they were (texts, then pairs: privatize_examples' order), plain tokens left out.
    sent = [t for e in private for t in e.ids[m:]] + [t for e in private for t in (e.pair_ids or ())]
    before = [t for r in raw[:n] for t in r[m:]] + [t for r in raw[n:] for t in r]
    metrics = {"num-examples": n, "tokens": len(sent),
               "tokens-unchanged": float(np.mean(np.asarray(sent) == np.asarray(before))) if sent else 0.0,
               "privatize-s": time.perf_counter() - start, "partition-id": partition_id}
    content = RecordDict({ARRAYS: examples_to_arrays(private, m), METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)
