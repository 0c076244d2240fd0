"""FedDTPT's client: one call of ``train`` = one client's prompt search in one round.

The client receives the global prompt, searches it against the black box (``service.kind``: in this
process, or a ``fedprompt serve`` / OpenAI-compatible server at ``service.url``) on its own partition plus
the public pool, and replies with its prompt words and numbers about the search (records.py). Its
examples, labels and search history stay here. The search itself is plain Python
(``fedprompt.methods.feddtpt.local``); this module decodes, calls it and encodes the reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Context, Message

from fedprompt.fl.client import ClientRound, PerRun, reply, round_seed, usage_metrics
from fedprompt.fl.feddtpt.records import arrays_to_words, words_to_arrays
from fedprompt.fl.records import ARRAYS

if TYPE_CHECKING:
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.feddtpt.local import LocalSearch


@dataclass
class FedDTPTClientState:
    data: ClientData
    local: LocalSearch  # the method's settings, the search (holds the proposer's model) and the black box


def _build(cfg, node_config) -> FedDTPTClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.feddtpt import PromptSearch, build_proposer
    from fedprompt.methods.feddtpt.local import LocalSearch

    method = method_config(cfg)
    data = client_data(cfg, node_config)
    if method.privatize.enabled:  # every text of the client's own is privatized before any query is formatted
        data = _privatized(data, method.privatize, cfg)
    return FedDTPTClientState(data, LocalSearch(method, PromptSearch(method.search, build_proposer(method.proposer)),
                                                make_blackbox(cfg)))


# A new run in this process first closes the previous run's black-box connections.
CLIENT = PerRun(_build, release=lambda old: old.local.blackbox.close())


def _privatized(data, privatize, cfg):
    """The client data with every partition's text privatized (d_chi, one seed per partition); the public pool is public."""
    from dataclasses import replace

    from fedprompt.methods.feddtpt.local import privatize_partitions
    from fedprompt.privacy.dchi import load_privatizer

    privatizer, tokenizer = load_privatizer(privatize, str(cfg.model.name))
    clients = privatize_partitions(data.partition.clients, privatizer, tokenizer, lambda i: round_seed(int(cfg.seed), 0, i))
    return replace(data, partition=replace(data.partition, clients=clients))


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's search in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = CLIENT.get(context, cfg)
    data = state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    start = time.perf_counter()
    result = state.local.round(data.spec, arrays_to_words(msg.content[ARRAYS]), data.partition.clients[now.partition_id],
                               data.public, server_round=now.server_round, partition_id=now.partition_id, seed=now.seed,
                               run_seed=int(cfg.seed))
    # None (left out): not scored (feedback=none)
    return reply(msg, words_to_arrays(result.prompt), {
        "partition-id": now.partition_id, "batch-accuracy": result.accuracy, "local-accuracy": result.local_accuracy,
        "start-accuracy": result.start_accuracy, "queries": result.queries, "steps": result.steps,
        "prompt-length": len(result.prompt), **usage_metrics(result.usage), "search-s": time.perf_counter() - start})
