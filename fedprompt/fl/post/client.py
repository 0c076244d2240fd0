"""POST's client: one call of ``train`` = one client's local soft-prompt tuning in one round.

The client receives the global prompt, trains it for ``method.train.local_steps`` steps on its own
partition (on the model ``method.model``: the distilled student by default), with DP-SGD when
``method.privacy.epsilon`` is set, and replies with its prompt and numbers (records.py). With DP its
accountant's history is kept in ``context.state``, which Flower keeps per node across the rounds of a
run, so the epsilon it reports is cumulative; the noise is planned once for all ``federation.rounds``.

With DP the reply holds the noisy prompt and public values only (:data:`~fedprompt.fl.post.records.DP_REPLY_METRICS`):
the numbers computed from the client's data (loss, token and example counts of its batches, timing) stay
on the client, in its own folder's :data:`LOCAL_LOG` (the cost figures of an experiment are read there).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message

from fedprompt.fl.client import ClientRound, PerRun, reply
from fedprompt.fl.post.records import DP_REPLY_METRICS, PRIVACY_STATE, PROMPT, history_to_record, record_to_history, soft_prompt
from fedprompt.fl.records import ARRAYS, prompt_to_arrays

if TYPE_CHECKING:
    from fedprompt.fl.data import ClientData
    from fedprompt.methods.post import POSTConfig, SoftPromptTuner

LOCAL_LOG = "post-local.json"  # {round: the numbers a DP client keeps to itself}, in clients/<partition-id>/


@dataclass
class POSTClientState:
    method: POSTConfig
    data: ClientData
    tuner: SoftPromptTuner  # holds the model


def _build(cfg, node_config) -> POSTClientState:
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.post import SoftPromptTuner
    from fedprompt.models import load_causal_lm, load_tokenizer
    from fedprompt.models.distill import resolve_model

    method = method_config(cfg)
    data = client_data(cfg, node_config)
    name = resolve_model(method.model, str(cfg.model.name))
    model = load_causal_lm(name, method.device, method.dtype)
    return POSTClientState(method, data, SoftPromptTuner(model, load_tokenizer(name), data.spec, method.train))


CLIENT = PerRun(_build)


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local tuning in one round; raises on failure (the ClientApp turns that into an error reply)."""
    from fedprompt.methods.post.tuning import planned_steps
    from fedprompt.privacy.dp import plan_dp

    state = CLIENT.get(context, cfg)
    method, clients = state.method, state.data.partition.clients
    now = ClientRound.of(msg, context, cfg, len(clients))
    examples = clients[now.partition_id]
    prompt = soft_prompt(msg.content[ARRAYS])
    plan, history = None, []
    if method.privacy.enabled:
        plan = plan_dp(method.privacy, len(examples), method.train.batch_size,
                       planned_steps(int(cfg.federation.rounds), method.train.local_steps))
        history = record_to_history(context.state.get(PRIVACY_STATE))
    result = state.tuner.train(prompt, examples, seed=now.seed, plan=plan, history=history)
    if plan is not None:
        context.state[PRIVACY_STATE] = history_to_record(result.history)
    metrics = {
        "num-examples": len(examples), "partition-id": now.partition_id, "loss": result.mean_loss, "steps": result.steps,
        "examples-seen": result.examples_seen, "empty-batches": result.empty_batches, "tokens": result.tokens,
        "train-s": result.seconds, "epsilon": result.epsilon, "delta": result.delta,
        "noise-multiplier": result.noise_multiplier,
    }
    if plan is not None:  # the noisy prompt and public values only; the rest stays here
        write_local_log(cfg, context, now.server_round, {k: v for k, v in metrics.items() if k not in DP_REPLY_METRICS})
        metrics = {k: v for k, v in metrics.items() if k in DP_REPLY_METRICS}
    return reply(msg, prompt_to_arrays({PROMPT: result.prompt.weight}), metrics)


def write_local_log(cfg, context: Context, server_round: int, numbers: dict) -> None:
    """Add round ``server_round``'s ``numbers`` to the client's :data:`LOCAL_LOG` (a redone round replaces its entry)."""
    from fedprompt.fl.checkpoint import client_dir

    folder = client_dir(cfg, context)
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCAL_LOG
    log = json.loads(path.read_text()) if path.is_file() else {}
    log[str(server_round)] = numbers
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(log, indent=1) + "\n")
    os.replace(tmp, path)


def local_totals(run_folder: str | Path) -> dict[str, float]:
    """The DP clients' own numbers of a run folder (every :data:`LOCAL_LOG`), summed over clients and rounds: what
    the experimenter, who holds every client's folder in a simulation, counts costs with; the server never reads them."""
    totals: dict[str, float] = {}
    for path in sorted(Path(run_folder).glob(f"clients/*/{LOCAL_LOG}")):
        for numbers in json.loads(path.read_text()).values():
            for key in ("tokens", "train-s", "examples-seen", "empty-batches"):
                totals[key] = totals.get(key, 0.0) + float(numbers.get(key, 0.0))
    return totals
