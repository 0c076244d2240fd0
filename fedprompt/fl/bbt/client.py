"""FedAvg-BBT's / FedBPT's client: one call of ``train`` = one client's local CMA-ES in one round.

The client receives the global point (z, sigma), runs ``method.local_iterations`` CMA-ES iterations from
N(z, sigma^2 I) against its soft-prompt black box on its own partition, and replies with a point and
numbers (records.py). The projection A and P0 are rebuilt here from the shared seed, once per process.
Its examples, labels and CMA-ES covariance never leave it; its only cross-round state (cumulative
queries) lives in ``context.state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Context, Message, MetricRecord

from fedprompt.fl.bbt.records import STATE, arrays_to_point, point_to_arrays
from fedprompt.fl.client import ClientRound, PerRun, reply, usage_metrics
from fedprompt.fl.records import ARRAYS

if TYPE_CHECKING:
    from fedprompt.blackbox import SoftPromptBlackBox
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.bbt import BBTConfig, LocalCMA


@dataclass
class BBTClientState:
    method: BBTConfig
    data: ClientData
    blackbox: SoftPromptBlackBox
    search: LocalCMA  # holds the projection


def _build(cfg, node_config) -> BBTClientState:
    from fedprompt.fl.bbt.server import soft_prompt_blackbox
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.bbt import LocalCMA
    from fedprompt.methods.bbt.projection import projection_for

    method = method_config(cfg)
    data = client_data(cfg, node_config)
    blackbox = soft_prompt_blackbox(cfg)
    projection = projection_for(method, blackbox, data.spec.manual_prompt, int(cfg.seed))
    return BBTClientState(method, data, blackbox, LocalCMA(method, projection))


CLIENT = PerRun(_build, release=lambda old: old.blackbox.close())


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local CMA-ES in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = CLIENT.get(context, cfg)
    method, data = state.method, state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    examples = data.partition.clients[now.partition_id]
    z, sigma = arrays_to_point(msg.content[ARRAYS], method.intrinsic_dim)
    result = state.search.run(state.blackbox, [data.spec.format(e) for e in examples], [e.label for e in examples],
                              list(data.spec.label_words), z, sigma,
                              seed=now.seed)
    if method.mode == "fedavg":
        point = result.best_z if method.client_return == "best" else result.mean
    else:  # fedbpt: the client's distribution
        point = result.mean
    total = int(context.state[STATE]["queries-total"]) if STATE in context.state else 0
    context.state[STATE] = MetricRecord({"queries-total": total + result.queries})
    return reply(msg, point_to_arrays(point, result.sigma), {
        "num-examples": len(examples), "partition-id": now.partition_id, "queries": result.queries,
        "queries-total": total + result.queries, "loss": result.best_loss, "last-loss": result.losses[-1],
        "iterations": result.iterations, "evaluations": result.evaluations, **usage_metrics(result.usage),
        "search-s": result.seconds})
