"""POST on Flower: the message layout, FedAvg of soft prompts, the client and the server (the round template's
:class:`~fedprompt.fl.rounds.MethodServer`). The tuning is plain Python in fedprompt.methods.post.

Messages. Server -> client: ``"arrays"`` {``"prompt"``: float32 (P, H), the global soft prompt} and ``"config"``
{``"server-round"``}. Client -> server: ``"arrays"`` (its locally tuned prompt, same layout) and ``"metrics"``
(numbers only). FedAvg averages the prompts weighted by ``num-examples``. Without DP the metrics are all of
:data:`REPLY_METRICS`. With DP the reply carries :data:`DP_REPLY_METRICS` only: the prompt is the output of
DP-SGD, and every number beside it is a function of public values (the client's example count N, which is
released, and the run's hyper-parameters); the loss, the batches' token and example counts and the training
time are computed from the client's data, so a DP client keeps them in its own folder's :data:`LOCAL_LOG`.

A client trains for ``method.train.local_steps`` steps on its partition, on ``method.model`` (the distilled
student by default). With DP its accountant's history (noise multiplier, sampling rate and steps of each stretch)
is kept in ``context.state`` as :data:`PRIVACY_STATE`, so the epsilon it reports is cumulative; the noise is
planned once for all ``federation.rounds``. The server evaluates the global prompt on the model the prompts are
tuned on and saves it as ``prompt.safetensors``; with DP, summary.json reports each client's accounted
(epsilon, delta) and the largest of each (:func:`privacy_summary`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedprompt.fl.client import ClientRound, PerRun, reply
from fedprompt.fl.records import array_record, arrays_to_prompt, config_record, prompt_to_arrays, record_value
from fedprompt.fl.rounds import MethodServer, Scored, serve
from fedprompt.fl.strategy import FedStrategy

if TYPE_CHECKING:
    from fedprompt.methods.post.config import POSTConfig
    from fedprompt.methods.post.tuning import SoftPromptTuner
    from fedprompt.models.soft_prompt import SoftPrompt
    from fedprompt.runs.data import ClientData

PROMPT = "prompt"
PROMPT_FILE = "prompt.safetensors"
PRIVACY_STATE = "post-privacy"
LOCAL_LOG = "post-local.json"  # {round: the numbers a DP client keeps to itself}, in clients/<partition-id>/

REPLY_METRICS = (
    "num-examples",      # the client's training examples: FedAvg's weight
    "partition-id",      # which client this is (for the per-client privacy report)
    "loss",              # mean training loss over the round's non-empty batches
    "steps",             # optimizer steps this round
    "examples-seen",     # examples in this round's batches
    "empty-batches",     # Poisson batches that drew no example (DP only)
    "tokens",            # token positions run forward and backward this round
    "train-s",           # wall time of the local training
    "epsilon",           # DP only: cumulative epsilon of this client after this round
    "delta",             # DP only
    "noise-multiplier",  # DP only: sigma of this client's DP-SGD
)
# What a DP client sends beside its noisy prompt: N (public: FedAvg's weight, the sampling rate) and values
# computed from N and the run's hyper-parameters alone (the accountant's epsilon and delta, sigma, the steps).
DP_REPLY_METRICS = ("num-examples", "partition-id", "steps", "epsilon", "delta", "noise-multiplier")


def soft_prompt(arrays: ArrayRecord) -> SoftPrompt:
    """The soft prompt of an ArrayRecord (``{"prompt": (P, H)}``, :func:`fedprompt.fl.records.prompt_to_arrays`)."""
    from fedprompt.models.soft_prompt import SoftPrompt

    weight = arrays_to_prompt(arrays, {PROMPT: (None, None)})[PROMPT]
    return SoftPrompt(weight.shape[0], weight.shape[1], torch.from_numpy(weight))


def history_to_record(history: list[tuple[float, float, int]]) -> ConfigRecord:
    return ConfigRecord({"noise-multiplier": [float(h[0]) for h in history], "sample-rate": [float(h[1]) for h in history],
                         "steps": [int(h[2]) for h in history]})


def record_to_history(record: ConfigRecord | None) -> list[tuple[float, float, int]]:
    if record is None:
        return []
    return list(zip(map(float, record_value(record, "noise-multiplier", list[float])),
                    map(float, record_value(record, "sample-rate", list[float])),
                    map(int, record_value(record, "steps", list[int]))))


class PromptFedAvg(FedStrategy):
    """FedAvg of soft prompts (McMahan et al. 2017) over the ``"prompt"`` array, weighted by each client's number
    of examples (public, DP or not: docs/privacy.md). Replies without a prompt of the global prompt's shape or
    without a positive example count are refused. ``aggregation["clients"]`` lists every client's metrics
    (epsilon included) in partition order; the combined metrics hold the largest epsilon and delta."""

    _shape: tuple[int, ...] | None = None

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self._shape = tuple(arrays[PROMPT].shape)

    def invalid(self, msg: Message) -> str | None:
        return self.weighted_layout(msg, lambda arrays: arrays_to_prompt(arrays, {PROMPT: self._shape or (None, None)}))

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        return aggregate_arrayrecords([m.content for m in valid], self.weighted_by_key)


# --- the client --------------------------------------------------------------------------------------------------


@dataclass
class POSTClientState:
    method: POSTConfig
    data: ClientData
    tuner: SoftPromptTuner  # holds the model


def _build(cfg, node_config) -> POSTClientState:
    from fedprompt.methods.post import SoftPromptTuner
    from fedprompt.models import load_causal_lm, load_tokenizer
    from fedprompt.models.distill import resolve_model
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

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
    prompt = soft_prompt(array_record(msg.content))
    plan, history = None, []
    if method.privacy.enabled:
        plan = plan_dp(method.privacy, len(examples), method.train.batch_size,
                       planned_steps(int(cfg.federation.rounds), method.train.local_steps))
        history = record_to_history(config_record(context.state, PRIVACY_STATE) if PRIVACY_STATE in context.state else None)
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


# --- the server --------------------------------------------------------------------------------------------------


def check_student_text(cfg, student: str) -> None:
    """A student's distillation text is a set the run's prompt is learnt through: refuse it (one line) if it shares
    content with the evaluation examples. A student built by ``fedprompt distill`` names its text in
    distill_report.json; one from elsewhere (or an older report, without data_split) has no record to check."""
    from fedprompt.data import load_task
    from fedprompt.data.leakage import check_disjoint
    from fedprompt.errors import DataError, FedPromptError
    from fedprompt.runs.data import eval_examples, load_task_and_spec

    path = Path(student) / "distill_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    split, sources = report.get("data_split"), report.get("data_sources") or {}
    if not split:
        return
    learning = {}
    for name in report.get("data_tasks", []):
        label = f"the student's distillation text ({name} {split})"
        try:  # read as distill read it (its task conf, else the folder alone), from this run's data_dir
            learning[label] = load_task(sources.get(name) or {"name": name}, cfg.get("data_dir")).split(split)
        except FedPromptError as err:
            raise DataError(f"{label}, named in {path}, cannot be read to check it against the evaluation "
                            f"split: {err}") from None
    # No eval_overlap=exclude here: the student has already learnt from that text; distil it again on other text.
    check_disjoint(learning, f"{cfg.federation.eval_split} split", eval_examples(cfg, load_task_and_spec(cfg)[0]),
                   remedy="or distil a student on other tasks (fedprompt distill distill.data.tasks=[...])")


def check(cfg, spec) -> dict:
    """POST's checks before launch: the tuned-on model exists, label words, prompt length, every client's DP plan,
    a student distilled neither on the clients' text nor on the evaluation examples."""
    from transformers import AutoConfig

    from fedprompt.methods.post.student import check_student_not_distilled_on
    from fedprompt.methods.post.tuning import check_prompt_fits, label_token_ids, planned_steps
    from fedprompt.models import load_tokenizer, materialize
    from fedprompt.models.distill import resolve_model
    from fedprompt.privacy.dp import plan_dp
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    name = resolve_model(method.model, str(cfg.model.name))
    check_student_not_distilled_on(str(cfg.task.name), name)
    tokenizer = load_tokenizer(name)  # also converts an embedded model once, before the clients start
    label_token_ids(tokenizer, spec.label_words)
    check_student_text(cfg, name)
    clients = client_data(cfg).partition.clients
    longest = max(len(ids) for c in clients for ids in tokenizer([spec.format(e) for e in c])["input_ids"])
    context = getattr(AutoConfig.from_pretrained(materialize(name)), "max_position_embeddings", None)
    check_prompt_fits(method.prompt.num_tokens, longest, context)
    facts: dict = {"tuning_model": name}
    if method.privacy.enabled:
        steps = planned_steps(int(cfg.federation.rounds), method.train.local_steps)
        plans = [plan_dp(method.privacy, len(c), method.train.batch_size, steps) for c in clients]
        facts["noise_multipliers"] = [p.noise_multiplier for p in plans]
        facts["deltas"] = [p.delta for p in plans]
    return facts


class POSTServer(MethodServer):
    """Evaluates the global prompt on the model the prompts are tuned on (the references: that model with the
    manual prompt or no instruction, no soft prompt)."""

    def __init__(self, cfg, method, task, spec, examples) -> None:
        from fedprompt.methods.post import initial_prompt
        from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer
        from fedprompt.models.distill import resolve_model

        super().__init__(cfg, method, task, spec, examples)
        self.name = resolve_model(method.model, str(cfg.model.name))
        model, tokenizer = load_causal_lm(self.name, method.device, method.dtype), load_tokenizer(self.name)
        self.classifier = PromptedClassifier(model, tokenizer, spec, batch_size=int(cfg.batch_size))
        self.device = next(model.parameters()).device
        self.init = initial_prompt(method.prompt, spec, tokenizer, model)

    def strategy(self, **common) -> PromptFedAvg:
        return PromptFedAvg(**common)

    def info(self) -> dict:
        method = self.method
        return {"tuning_model": self.name, "prompt_tokens": self.init.num_tokens,
                "local_steps": method.train.local_steps, "batch_size": method.train.batch_size,
                "target_epsilon": method.privacy.epsilon if method.privacy.enabled else None,
                "noise_seed": method.privacy.noise_seed if method.privacy.enabled else None}

    def untuned(self, rows, text):
        return self.classifier.predict(rows, text)

    def initial_arrays(self) -> ArrayRecord:
        return prompt_to_arrays({PROMPT: self.init.weight})

    def score(self, server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        if not due:
            return Scored()
        return Scored(predictions=self.classifier.predict(self.examples, soft_prompt=soft_prompt(arrays).to(self.device)))

    def save(self, folder: Path, arrays: ArrayRecord) -> dict:
        from fedprompt.methods.post import save_prompt

        # Totals from the report's rows, which a resumed run restored: they cover the rounds before a stop too.
        rows, rounds = self.report.rows, int(self.cfg.federation.rounds)
        dp = self.method.privacy.enabled
        privacy = privacy_summary(rows, int(self.cfg.federation.num_clients)) if dp else {
            "epsilon_per_client": None, "delta_per_client": None, "epsilon": None, "delta": None}
        path = save_prompt(soft_prompt(arrays), folder / PROMPT_FILE, task=self.spec.name, tuning_model=self.name,
                           epsilon=privacy["epsilon"], delta=privacy["delta"], rounds=rounds)
        # A DP client does not send its training time or tokens (computed from its data): null then, see
        # local_totals for the clients' own figures.
        metrics = [row.get("client_metrics") or {} for row in rows]
        return {"prompt_file": str(path), **privacy,
                "client_train_s": None if dp else round(sum(m.get("train-s", 0.0) for m in metrics), 3),
                "client_tokens": None if dp else int(sum(m.get("tokens", 0.0) for m in metrics))}


def privacy_summary(rows: list[dict], num_clients: int) -> dict:
    """Each client's (epsilon, delta) after its last valid reply (epsilon is cumulative), in partition order (null
    for a client with none), and the largest of each. A reply refused as malformed or come after its round's
    timeout is not counted; ``target_epsilon`` bounds every client whatever it sent (sigma is planned for a
    client that trains in every round)."""
    epsilons: list[float | None] = [None] * num_clients
    deltas: list[float | None] = [None] * num_clients
    for row in rows:
        for client in (row.get("aggregation") or {}).get("clients", []):
            pid = int(client.get("partition-id", -1))
            if 0 <= pid < num_clients and "epsilon" in client:
                epsilons[pid], deltas[pid] = float(client["epsilon"]), float(client["delta"])
    released_eps = [e for e in epsilons if e is not None]
    released_delta = [d for d in deltas if d is not None]
    return {"epsilon_per_client": epsilons, "delta_per_client": deltas,
            "epsilon": max(released_eps) if released_eps else None,
            "delta": max(released_delta) if released_delta else None}


def run_server(grid, cfg) -> dict:
    return serve(grid, cfg, POSTServer)
