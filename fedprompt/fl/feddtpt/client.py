"""FedDTPT's client: one call of ``train`` = one client's prompt search in one round.

The client receives the global prompt, searches it against the black box (``service.kind``: in this
process, or a ``fedprompt serve`` / OpenAI-compatible server at ``service.url``) on its own partition plus
the public pool, and replies with its prompt words and numbers about the search (records.py). Its
examples, labels and search history stay here.
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
    from fedprompt.blackbox import BlackBoxLM
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.feddtpt import FedDTPTConfig, PromptSearch


@dataclass
class FedDTPTClientState:
    method: FedDTPTConfig
    data: ClientData
    search: PromptSearch  # holds the proposer's model
    blackbox: BlackBoxLM


def _build(cfg, node_config) -> FedDTPTClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.feddtpt import PromptSearch, build_proposer

    method = method_config(cfg)
    data = client_data(cfg, node_config)
    if method.privatize.enabled:  # every text of the client's own is privatized before any query is formatted
        data = _privatized(data, method.privatize, cfg)
    return FedDTPTClientState(method, data, PromptSearch(method.search, build_proposer(method.proposer)),
                              make_blackbox(cfg))


# A new run in this process first closes the previous run's black-box connections.
CLIENT = PerRun(_build, release=lambda old: old.blackbox.close())


def _privatized(data, privatize, cfg):
    """The client data with every partition's text privatized (d_chi, one seed per partition); the public pool is public."""
    from dataclasses import replace

    from fedprompt.privacy.dchi import load_privatizer

    privatizer, tokenizer = load_privatizer(privatize, str(cfg.model.name))
    clients = [privatizer.privatize_examples(examples, tokenizer, seed=round_seed(int(cfg.seed), 0, i)) if examples
               else [] for i, examples in enumerate(data.partition.clients)]  # empty: a partition this node lacks
    return replace(data, partition=replace(data.partition, clients=clients))


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's search in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = CLIENT.get(context, cfg)
    data = state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    prompt = arrays_to_words(msg.content[ARRAYS])
    if now.server_round == 1 and state.method.seed_prompt.style == "mixed":
        prompt = state.method.initial_prompt(data.spec, now.partition_id)  # each client starts from its own style
    start = time.perf_counter()
    result = state.search.run(
        state.blackbox, data.spec, prompt, data.partition.clients[now.partition_id], data.public, seed=now.seed,
        # public_shared: the round's public batch is the same for every client (seeded without the partition)
        public_seed=(int(cfg.seed), now.server_round) if state.method.search.public_shared else None,
        # shared_edits: every client of the round tries the same edits in the same order (see PromptSearch.run)
        edit_seed=(int(cfg.seed), now.server_round, 1) if state.method.search.shared_edits else None,
    )
    # None (left out): not scored (feedback=none)
    return reply(msg, words_to_arrays(result.prompt), {
        "partition-id": now.partition_id, "batch-accuracy": result.accuracy, "local-accuracy": result.local_accuracy,
        "start-accuracy": result.start_accuracy, "queries": result.queries, "steps": result.steps,
        "prompt-length": len(result.prompt), **usage_metrics(result.usage), "search-s": time.perf_counter() - start})
