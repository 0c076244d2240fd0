"""FedDTPT's client: one call of ``train`` = one client's prompt search in one round.

The client receives the global prompt, searches it against the black box (``service.kind``: in this
process, or a ``fedprompt serve`` / OpenAI-compatible server at ``service.url``) on its own partition plus
the public pool, and replies with its prompt words and numbers about the search (records.py). Its
examples, labels and search history stay here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedprompt.fl.feddtpt.records import arrays_to_prompt, prompt_to_arrays
from fedprompt.fl.records import ARRAYS, CONFIG, METRICS


@dataclass
class ClientState:
    """What a client process loads once and reuses every round (Ray keeps its actors alive)."""

    cfg: Any
    method: Any  # FedDTPTConfig
    data: Any  # fedprompt.fl.data.ClientData
    search: Any  # PromptSearch (holds the proposer's model)
    blackbox: Any  # BlackBoxLM


_STATE: dict[str, ClientState] = {}


def client_state(run_config, cfg) -> ClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.fl.config import method_config, once_per_run
    from fedprompt.fl.data import client_data
    from fedprompt.methods.feddtpt import PromptSearch, build_proposer

    def build() -> ClientState:
        method = method_config(cfg)
        data = client_data(cfg)
        if method.privatize.enabled:  # every text of the client's own is privatized before any query is formatted
            data = _privatized(data, method.privatize, cfg)
        return ClientState(cfg, method, data, PromptSearch(method.search, build_proposer(method.proposer)),
                           make_blackbox(cfg))

    # A new run in this process first closes the previous run's black-box connections.
    return once_per_run(_STATE, run_config, build, release=lambda old: old.blackbox.close())


def _privatized(data, privatize, cfg):
    """The client data with every partition's text privatized (d_chi, one seed per partition); the public pool is public."""
    from dataclasses import replace

    from fedprompt.privacy.dchi import load_privatizer

    privatizer, tokenizer = load_privatizer(privatize, str(cfg.model.name))
    clients = [privatizer.privatize_examples(examples, tokenizer, seed=int(cfg.seed) * 1_000_003 + i)
               for i, examples in enumerate(data.partition.clients)]
    return replace(data, partition=replace(data.partition, clients=clients))


def _search_seed(base: int, server_round: int, partition_id: int) -> int:
    # Distinct per client and round, reproducible for a given run seed.
    return (int(base) * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's search in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = client_state(context.run_config, cfg)
    cfg, data = state.cfg, state.data
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != len(data.partition.clients):
        raise RuntimeError(f"{num_partitions} SuperNodes but federation.num_clients={len(data.partition.clients)}")
    server_round = int(msg.content[CONFIG]["server-round"])
    prompt = arrays_to_prompt(msg.content[ARRAYS])
    if server_round == 1 and state.method.seed_prompt.style == "mixed":
        prompt = state.method.initial_prompt(data.spec, partition_id)  # each client starts from its own style
    start = time.perf_counter()
    result = state.search.run(
        state.blackbox, data.spec, prompt, data.partition.clients[partition_id], data.public,
        seed=_search_seed(cfg.seed, server_round, partition_id),
        # public_shared: the round's public batch is the same for every client (seeded without the partition)
        public_seed=(int(cfg.seed), server_round) if state.method.search.public_shared else None,
        # shared_edits: every client of the round tries the same edits in the same order (see PromptSearch.run)
        edit_seed=(int(cfg.seed), server_round, 1) if state.method.search.shared_edits else None,
    )
    usage = result.usage
    metrics = {
        "batch-accuracy": result.accuracy, "local-accuracy": result.local_accuracy,
        "start-accuracy": result.start_accuracy, "queries": result.queries, "steps": result.steps,
        "prompt-length": len(result.prompt), "bb-requests": usage.requests, "bb-prompt-tokens": usage.prompt_tokens,
        "bb-bytes-sent": usage.bytes_sent, "bb-bytes-received": usage.bytes_received,
        "search-s": time.perf_counter() - start,
    }
    content = RecordDict({
        ARRAYS: prompt_to_arrays(result.prompt),
        METRICS: MetricRecord({k: v for k, v in metrics.items() if v is not None}),  # None: not scored (feedback=none)
    })
    return Message(content, reply_to=msg)
