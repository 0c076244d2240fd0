"""FedAvg-BBT's / FedBPT's client: one call of ``train`` = one client's local CMA-ES in one round.

The client receives the global point (z, sigma), runs ``method.local_iterations`` CMA-ES iterations from
N(z, sigma^2 I) against its soft-prompt black box on its own partition, and replies with a point and
numbers (records.py). The projection A and P0 are rebuilt here from the shared seed, once per process.
Its examples, labels and CMA-ES covariance never leave it; its only cross-round state (cumulative
queries) lives in ``context.state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedprompt.fl.bbt.records import STATE, arrays_to_point, point_to_arrays
from fedprompt.fl.records import ARRAYS, CONFIG, METRICS


@dataclass
class ClientState:
    """What a client process builds once per run and reuses every round (Ray keeps its actors alive)."""

    method: Any  # BBTConfig
    data: Any  # fedprompt.fl.data.ClientData
    blackbox: Any  # SoftPromptBlackBox
    search: Any  # LocalCMA (holds the projection)


_STATE: dict[str, ClientState] = {}


def client_state(run_config, cfg) -> ClientState:
    from fedprompt.fl.bbt.server import soft_prompt_blackbox
    from fedprompt.fl.config import method_config, once_per_run
    from fedprompt.fl.data import client_data
    from fedprompt.methods.bbt import LocalCMA
    from fedprompt.methods.bbt.projection import projection_for

    def build() -> ClientState:
        method = method_config(cfg)
        data = client_data(cfg)
        blackbox = soft_prompt_blackbox(cfg)
        projection = projection_for(method, blackbox, data.spec.manual_prompt, int(cfg.seed))
        return ClientState(method, data, blackbox, LocalCMA(method, projection))

    return once_per_run(_STATE, run_config, build, release=lambda old: old.blackbox.close())


def _search_seed(base: int, server_round: int, partition_id: int) -> int:
    # Distinct per client and round, reproducible for a given run seed (so a resumed run repeats it).
    return (int(base) * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local CMA-ES in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = client_state(context.run_config, cfg)
    method, data = state.method, state.data
    partition_id = int(context.node_config["partition-id"])
    if int(context.node_config["num-partitions"]) != len(data.partition.clients):
        raise RuntimeError(f"{context.node_config['num-partitions']} SuperNodes but federation.num_clients="
                           f"{len(data.partition.clients)}")
    examples = data.partition.clients[partition_id]
    server_round = int(msg.content[CONFIG]["server-round"])
    z, sigma = arrays_to_point(msg.content[ARRAYS], method.intrinsic_dim)
    result = state.search.run(state.blackbox, [data.spec.format(e) for e in examples], [e.label for e in examples],
                              list(data.spec.label_words), z, sigma,
                              seed=_search_seed(cfg.seed, server_round, partition_id))
    if method.mode == "fedavg":
        point = result.best_z if method.client_return == "best" else result.mean
    else:  # fedbpt: the client's distribution
        point = result.mean
    total = int(context.state[STATE]["queries-total"]) if STATE in context.state else 0
    context.state[STATE] = MetricRecord({"queries-total": total + result.queries})
    usage = result.usage
    metrics = {
        "num-examples": len(examples), "partition-id": partition_id, "queries": result.queries,
        "queries-total": total + result.queries, "loss": result.best_loss, "last-loss": result.losses[-1],
        "iterations": result.iterations, "evaluations": result.evaluations, "bb-requests": usage.requests,
        "bb-prompt-tokens": usage.prompt_tokens, "bb-bytes-sent": usage.bytes_sent,
        "bb-bytes-received": usage.bytes_received, "search-s": result.seconds,
    }
    content = RecordDict({ARRAYS: point_to_arrays(point, result.sigma), METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)
