"""POST's server: FedAvg of the clients' soft prompts, a central evaluation of the global prompt on the model the
prompts are tuned on (round 0, every ``federation.eval_every``-th round and the last: fedprompt.fl.rounds), and
the results (the run folder's rounds.json / csv / accuracy.png / summary.json / checkpoint.json (resume), and
the final global prompt as ``prompt.safetensors``).

Round 0 is the text-initialised prompt. The server reads only the evaluation split; it never sees a
client's examples, only their prompts and numbers (with DP: public numbers only). With DP, summary.json
reports each client's accounted (epsilon, delta) and the largest of each (:func:`privacy_summary`).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedprompt.fl.post.records import PROMPT, soft_prompt
from fedprompt.fl.records import prompt_to_arrays

PROMPT_FILE = "prompt.safetensors"


def check_student_text(cfg, student: str) -> None:
    """A student's distillation text is a set the run's prompt is learnt through: refuse it (one line) if it shares
    content with the evaluation examples. A student built by ``fedprompt distill`` names its text in
    distill_report.json; one from elsewhere (or an older report, without data_split) has no record to check."""
    from fedprompt.data import load_task
    from fedprompt.data.leakage import check_disjoint
    from fedprompt.errors import DataError, FedPromptError
    from fedprompt.fl.data import eval_examples, load_task_and_spec

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


def student_distill_data(student: str) -> tuple[list[str], str | None, str]:
    """The tasks and split a student was distilled on, from its config.json (``fedprompt_student.distill_data``)
    or its distill_report.json, and which file said so; ([], None, "") for a model with neither."""
    folder = Path(student)
    config = folder / "config.json"
    if config.is_file():
        data = (json.loads(config.read_text()).get("fedprompt_student") or {}).get("distill_data")
        if data:
            return list(data.get("tasks") or []), data.get("split"), str(config)
    report = folder / "distill_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        return list(data.get("data_tasks") or []), data.get("data_split"), str(report)
    return [], None, ""


def check_student_not_distilled_on(task: str, student: str) -> None:
    """Refuse (one line, before any model loads) a student distilled on ``task``'s train split: the clients'
    private training text of this run."""
    from fedprompt.errors import DataError
    from fedprompt.models.distill import DistillDataConfig

    tasks, split, source = student_distill_data(student)
    if task in tasks and split == "train":
        others = DistillDataConfig(tasks=tasks).other_tasks(task)
        raise DataError(f"the student at {student} was distilled on {task}'s train split, the clients' training text of "
                        f"this run (distill data {tasks} {split}, in {source}); distil a student on other tasks: "
                        f"fedprompt distill task={task} distill.data.tasks=[{','.join(others)}] distill.output=<folder>, "
                        f"then method.model=<folder>")


def check(cfg, spec) -> dict:
    """POST's checks before launch: the tuned-on model exists, label words, prompt length, every client's DP plan,
    no evaluation example in the student's distillation text."""
    from transformers import AutoConfig

    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.post.tuning import check_prompt_fits, label_token_ids, planned_steps
    from fedprompt.models import load_tokenizer, materialize
    from fedprompt.models.distill import resolve_model
    from fedprompt.privacy.dp import plan_dp

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


def run_server(grid: Grid, cfg) -> dict:
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import eval_examples, load_task_and_spec, reference_examples
    from fedprompt.fl.post.strategy import PromptFedAvg
    from fedprompt.fl.protocol import measure_references, provenance
    from fedprompt.fl.records import audit_path
    from fedprompt.fl.report import RunReport
    from fedprompt.fl.rounds import Federation, RoundDriver, Scored
    from fedprompt.fl.run import run_folder
    from fedprompt.methods.post import initial_prompt, save_prompt
    from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer
    from fedprompt.models.distill import resolve_model

    fed, federation = cfg.federation, Federation.from_cfg(cfg)
    method = method_config(cfg)
    folder = run_folder(cfg)
    task, spec = load_task_and_spec(cfg)
    examples = eval_examples(cfg, task)
    name = resolve_model(method.model, str(cfg.model.name))
    model, tokenizer = load_causal_lm(name, method.device, method.dtype), load_tokenizer(name)
    classifier = PromptedClassifier(model, tokenizer, spec, batch_size=int(cfg.batch_size))
    device = next(model.parameters()).device
    init = initial_prompt(method.prompt, spec, tokenizer, model)
    strategy = PromptFedAvg(seed=int(cfg.seed), audit_path=audit_path(cfg, folder), **federation.fedavg_kwargs())
    report = RunReport(folder, {
        "method": method.name, "task": spec.name, "model": str(cfg.model.name), "tuning_model": name,
        "num_clients": int(fed.num_clients), "partition": dict(cfg.partition), "eval_split": str(fed.eval_split),
        "eval_n": len(examples), "manual_prompt": spec.manual_prompt, "prompt_tokens": init.num_tokens,
        "local_steps": method.train.local_steps, "batch_size": method.train.batch_size,
        "target_epsilon": method.privacy.epsilon if method.privacy.enabled else None,
        "noise_seed": method.privacy.noise_seed if method.privacy.enabled else None, **provenance(cfg),
    })
    driver = RoundDriver(cfg, folder, report, strategy, examples)  # resume=true: the report so far is restored here
    if fed.eval_references:  # the tuned-on model with the manual prompt or no instruction, no soft prompt
        measure_references(report, classifier.predict, spec, examples, reference_examples(cfg, task))

    def score(server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        if not due:
            return Scored()
        prompt = soft_prompt(arrays).to(device)
        return Scored(predictions=classifier.predict(examples, soft_prompt=prompt))

    result = driver.run(grid, prompt_to_arrays({PROMPT: init.weight}), score)
    # Totals from the report's rows, which a resumed run restored: they cover the rounds before a stop too.
    metrics = [row.get("client_metrics") or {} for row in report.rows]
    privacy = privacy_summary(report.rows, int(fed.num_clients)) if method.privacy.enabled else {
        "epsilon_per_client": None, "delta_per_client": None, "epsilon": None, "delta": None}
    path = save_prompt(soft_prompt(result.arrays), folder / PROMPT_FILE, task=spec.name, tuning_model=name,
                       epsilon=privacy["epsilon"], delta=privacy["delta"], rounds=int(fed.rounds))
    # A DP client does not send its training time or tokens (computed from its data): null then, see
    # fedprompt.fl.post.client.local_totals for the clients' own figures.
    released = not method.privacy.enabled
    return report.finish(prompt_file=str(path), **privacy,
                         client_train_s=round(sum(m.get("train-s", 0.0) for m in metrics), 3) if released else None,
                         client_tokens=int(sum(m.get("tokens", 0.0) for m in metrics)) if released else None)


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
