"""POST's client: one call of ``train`` = one client's local soft-prompt tuning in one round.

The client receives the global prompt, trains it for ``method.train.local_steps`` steps on its own
partition (on the model ``method.model``: the distilled student by default), with DP-SGD when
``method.privacy.epsilon`` is set, and replies with its prompt and numbers (records.py). With DP its
accountant's history is kept in ``context.state``, which Flower keeps per node across the rounds of a
run, so the epsilon it reports is cumulative; the noise is planned once for all ``federation.rounds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedprompt.fl.post.records import PRIVACY_STATE, arrays_to_prompt, history_to_record, prompt_to_arrays, record_to_history
from fedprompt.fl.records import ARRAYS, CONFIG, METRICS


@dataclass
class ClientState:
    """What a client process loads once and reuses every round (Ray keeps its actors alive)."""

    method: Any  # POSTConfig
    data: Any  # fedprompt.fl.data.ClientData
    tuner: Any  # SoftPromptTuner (holds the model)


_STATE: dict[str, ClientState] = {}


def client_state(run_config, cfg) -> ClientState:
    from fedprompt.fl.config import method_config, once_per_run
    from fedprompt.fl.data import client_data
    from fedprompt.methods.post import SoftPromptTuner
    from fedprompt.models import load_causal_lm, load_tokenizer
    from fedprompt.models.distill import resolve_model

    def build() -> ClientState:
        method = method_config(cfg)
        data = client_data(cfg)
        name = resolve_model(method.model, str(cfg.model.name))
        model = load_causal_lm(name, method.device, method.dtype)
        return ClientState(method, data, SoftPromptTuner(model, load_tokenizer(name), data.spec, method.train))

    return once_per_run(_STATE, run_config, build)


def _seed(base: int, server_round: int, partition_id: int) -> int:
    # Distinct per client and round, reproducible for a given run seed (batches and DP noise).
    return (int(base) * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local tuning in one round; raises on failure (the ClientApp turns that into an error reply)."""
    from fedprompt.methods.post.tuning import planned_steps
    from fedprompt.privacy.dp import plan_dp

    state = client_state(context.run_config, cfg)
    method, clients = state.method, state.data.partition.clients
    partition_id = int(context.node_config["partition-id"])
    if int(context.node_config["num-partitions"]) != len(clients):
        raise RuntimeError(f"{context.node_config['num-partitions']} SuperNodes but federation.num_clients={len(clients)}")
    examples = clients[partition_id]
    server_round = int(msg.content[CONFIG]["server-round"])
    prompt = arrays_to_prompt(msg.content[ARRAYS])
    plan, history = None, []
    if method.privacy.enabled:
        plan = plan_dp(method.privacy, len(examples), method.train.batch_size,
                       planned_steps(int(cfg.federation.rounds), method.train.local_steps))
        history = record_to_history(context.state.get(PRIVACY_STATE))
    result = state.tuner.train(prompt, examples, seed=_seed(cfg.seed, server_round, partition_id), plan=plan,
                               history=history)
    if plan is not None:
        context.state[PRIVACY_STATE] = history_to_record(result.history)
    metrics = {
        "num-examples": len(examples), "partition-id": partition_id, "loss": result.mean_loss, "steps": result.steps,
        "examples-seen": result.examples_seen, "empty-batches": result.empty_batches, "tokens": result.tokens,
        "train-s": result.seconds, "epsilon": result.epsilon, "delta": result.delta,
        "noise-multiplier": result.noise_multiplier,
    }
    content = RecordDict({
        ARRAYS: prompt_to_arrays(result.prompt),
        METRICS: MetricRecord({k: v for k, v in metrics.items() if v is not None}),
    })
    return Message(content, reply_to=msg)
