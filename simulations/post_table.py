"""POST's comparison table for one task, in one command (markdown + JSON, with each stage's wall time).

    python simulations/post_table.py --task sst2 [--out DIR] [--set key=value ...]

Stages, each at epsilon = infinity and at epsilon = --epsilon (8), on the first --eval-limit test examples:

1. large zero-shot: the large model (model=, SmolLM2-135M) with the task's manual prompt, no soft prompt (POST's
   ZS); large no instruction: the same without the instruction. The result protocol's *reference* is the better
   of the two on the first 500 validation examples (docs/experiments.md), scored here on the test examples;
2. direct: a soft prompt tuned centrally on the large model, on all clients' examples pooled, with the same
   number of steps and batch size as the clients take together (central DP-SGD, delta = min(1e-5, 1/(10 N)), at epsilon);
3. student: ``fedprompt run method=post`` (Flower, Ray): --clients clients (IID split of the train split),
   --rounds rounds of --local-steps steps each, DP-SGD per client at epsilon; the global prompt on the student;
4. pasted: that global prompt evaluated on the large model as it is;
5. POST: ``fedprompt transfer``'s transfer of it to the large model on the public set (alpha by POST's rule).

Derived: gap recovered (POST - reference) / (direct - reference), also against POST's ZS (the manual prompt),
and the cost ratio (student tuning +
transfer) / direct tuning, both as measured compute seconds (the clients' training time + the transfer,
alpha's two evaluations included) and as FLOP estimates (4 x non-embedding parameters x token positions
for forward+backward, 2 x for forward-only; the LM head is read at one position, so it is left out).
Distillation is a one-off of the model provider (built with `fedprompt distill` if missing) and is
reported apart. Writes post_<task>.json and post_<task>.md to --out (default simulations/results). Each
large-model test row keeps which examples it got right (``correct``, a 0/1 string in test order), so that gains
over the reference can be paired (simulations/post_headline.py).

Before any model loads, direct tuning's pooled examples and the validation examples that choose the reference are
checked against the test rows by content (a DataError; ``--set federation.eval_overlap=exclude`` drops shared
rows from direct and federated tuning alike).

A run resumes from --out's partial (or finished) table with the same settings, and a federated stage stopped mid-run
continues from its last round; delete post_<task>*.json there to start afresh. Rows that depend on the student
(student, pasted, POST) remember which distillation made it and are run again for another student; ``--reuse-large
FILE`` starts a table from a finished one's large-model rows (zero-shot, direct tuning: the expensive half) when
only the student changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--dp-lr", type=float, default=None, help="learning rate with DP (default: --lr)")
    ap.add_argument("--k-shot", type=int, default=None, help="training examples per class (default: the whole train split)")
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--transfer-steps", type=int, default=8)
    ap.add_argument("--public-size", type=int, default=128)
    ap.add_argument("--transfer-lr", type=float, default=0.03)
    ap.add_argument("--transfer-init", choices=("text", "student"), default="text",
                    help="the large model's prompt starts from the text init or from the student's prompt")
    ap.add_argument("--transfer-logits", choices=("vocab", "labels"), default="vocab",
                    help="the transfer's KL terms over all next-token logits (POST's) or the label words' only "
                         "(the ablation row 'POST transfer (label-word KL)')")
    ap.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    ap.add_argument("--set", action="append", default=[], help="extra fedprompt overrides, key=value")
    ap.add_argument("--student", default=None,
                    help="the student folder (default: fedprompt distill's, <cache>/students/<model>)")
    ap.add_argument("--reuse-large", default=None, metavar="FILE",
                    help="a finished post_<task>.json with the same settings: take its large-model rows")
    ap.add_argument("--stages", choices=("all", "direct"), default="all",
                    help="direct: only the large model's rows (they do not need the student); a later run resumes")
    return ap.parse_args(argv)


def non_embedding_parameters(model) -> int:
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if id(p) not in skip}.values())


def machine(device: str | None, dtype: str | None) -> str:
    """What runs this table, measured at its start: the device and dtype the models get (model.device and
    model.dtype resolved as the loader does) and the 1-minute load average, a hint of whether it ran alone (it
    lags: a job that ended a minute ago still counts)."""
    import torch

    from fedprompt.models.registry import resolve_device, resolve_dtype

    dev = resolve_device(device)
    where = f"GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "no GPU"
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {where}, "
            f"{str(resolve_dtype(dtype, dev)).removeprefix('torch.')}, load average {os.getloadavg()[0]:.1f} at start")


def find_row(rows: list[dict], stage: str, epsilon, **settings) -> dict | None:
    """The row of ``stage`` at ``epsilon`` (None, "inf" or e.g. "8") made with ``settings``, if any."""
    return next((r for r in rows if r["stage"] == stage and r["epsilon"] == epsilon
                 and all(r.get(k) == v for k, v in settings.items())), None)


def interrupted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a federated run stopped before its last round: it is resumed, not refused
    (fedprompt's resume check still refuses it if its settings differ from this table's)."""
    from fedprompt.fl.checkpoint import CHECKPOINT

    return (run_dir / CHECKPOINT).is_file() and not (run_dir / "result.json").is_file()


class Table:
    """The rows so far; each new row is printed and the partial table saved. A run with the same settings
    resumes from that file, or from the finished table: stages done are not run again (a long run that
    stops keeps its rows; a new transfer setting reruns only the transfer)."""

    def __init__(self, path: Path, info: dict, finished: Path | None = None) -> None:
        self.rows: list[dict] = []
        self.path, self.info = path, info
        self._here = None  # this start's machine, named once it makes a row
        source = path if path.is_file() else finished  # a finished table resumes too (e.g. another transfer)
        if source is not None and source.is_file():
            saved = json.loads(source.read_text())
            if _settings(saved.get("args", {})) == _settings(info["args"]):
                self.rows = saved["rows"]
                self.info.update({k: v for k, v in saved.items() if k not in ("rows", "args", "machine")})
                # One entry per start that makes a row, so a resumed table says every machine (and load) its
                # rows were made on; a start that only rewrites the summary adds none.
                self._here, self.info["machine"] = info.get("machine"), saved.get("machine")

    def done(self, stage: str, epsilon, **settings) -> dict | None:
        return find_row(self.rows, stage, epsilon, **settings)

    def current(self, stage: str, epsilon, **settings) -> dict | None:
        """``done``, after dropping this stage's rows made with other settings (they are run again)."""
        row = self.done(stage, epsilon, **settings)
        self.rows = [r for r in self.rows if r is row or not (r["stage"] == stage and r["epsilon"] == epsilon)]
        return row

    def reuse_large(self, path: Path) -> None:
        """Take the large-model rows of a finished table with the same settings (none of them uses a student)."""
        saved = json.loads(Path(path).read_text())
        theirs, ours = _settings(saved.get("args", {})), _settings(self.info["args"])
        if theirs != ours:
            diff = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            raise SystemExit(f"--reuse-large {path}: its settings differ in {diff}; run without it")
        for row in saved["rows"]:
            if row["stage"] in LARGE_STAGES and not self.done(row["stage"], row["epsilon"]):
                self.rows.append({**row, "reused_from": str(path)})
        if "alpha_zero_shot" in saved:
            self.info.setdefault("alpha_zero_shot", saved["alpha_zero_shot"])
        self.save_info()

    def add(self, stage: str, epsilon, accuracy: float, wall_s: float, **extra) -> dict:
        row = {"stage": stage, "epsilon": epsilon, "accuracy": round(float(accuracy), 4), "wall_s": round(wall_s, 1),
               **extra}
        self.rows.append(row)
        if self._here:
            self.info["machine"], self._here = "; ".join(filter(None, (self.info.get("machine"), self._here))), None
        print(json.dumps(row), flush=True)
        self.path.write_text(json.dumps({**self.info, "rows": self.rows}, indent=2) + "\n")
        return row

    def save_info(self) -> None:
        self.path.write_text(json.dumps({**self.info, "rows": self.rows}, indent=2) + "\n")


TRANSFER_ARGS = ("transfer_steps", "public_size", "transfer_lr", "transfer_init", "transfer_logits")
LARGE_STAGES = ("large zero-shot", "large no instruction", "direct (large, central)")
REFERENCE_STAGE = {"manual": "large zero-shot", "zero-shot": "large no instruction"}  # protocol kind -> its row
STAGES = (*LARGE_STAGES, "student (federated)", "student prompt pasted on large", "POST transfer")


def _row_order(row: dict) -> tuple:
    """Zero-shot first, then each epsilon's stages in pipeline order (resumed rows are appended out of order)."""
    epsilon = {None: 0, "inf": 1}.get(row["epsilon"], 2)
    return (epsilon, STAGES.index(row["stage"]))


def _settings(args: dict) -> dict:
    """The settings finished rows depend on (the transfer's and the student's are kept in their rows)."""
    return {k: v for k, v in args.items() if k not in ("out", "stages", "student", "reuse_large", *TRANSFER_ARGS)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from fedprompt.commands.post import cmd_distill, public_examples, transfer_prompt
    from fedprompt.commands.run import cmd_run
    from fedprompt.config import compose, load_task_checked
    from fedprompt.fl.post import local_totals
    from fedprompt.methods.post import PromptConfig, SoftPromptTuner, TrainConfig, TransferConfig, initial_prompt, load_prompt
    from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer
    from fedprompt.models.distill import default_student_dir
    from fedprompt.privacy.dp import PrivacyConfig, plan_dp
    from fedprompt.runs.data import check_no_leak, eval_examples, reference_examples, training_examples
    from fedprompt.runs.protocol import untuned_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.clients * args.rounds * args.local_steps
    k_shot = "null" if args.k_shot is None else str(args.k_shot)
    # eval_limit in every composed config: eval_overlap=exclude then drops the same rows for both direct and federated tuning.
    base = [f"task={args.task}", "progress=false", f"federation.eval_limit={args.eval_limit}", *args.set]
    cfg = compose(base)
    large_name = str(cfg.model.name)
    info: dict = {"task": args.task, "model": large_name, "args": vars(args), "total_steps": steps,
                  "machine": machine(cfg.model.get("device"), cfg.model.get("dtype"))}
    table = Table(out / f"post_{args.task}.partial.json", info, finished=out / f"post_{args.task}.json")
    if args.reuse_large:
        table.reuse_large(Path(args.reuse_large))

    # The data and its leak check come before any distillation or model load. The federated stage's own check
    # (fedprompt run) covers only that run, so direct tuning's pooled examples (all the clients' examples) and
    # the reference examples are checked here with the same function and federation.eval_overlap policy.
    task = load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    train = training_examples(compose([*base, f"partition.k_shot={k_shot}"]), task, spec)
    evaluation = eval_examples(cfg, task)  # the federated run's too: the first --eval-limit test examples by default
    validation = reference_examples(cfg, task)  # the first federation.reference_limit (500) validation examples
    check_no_leak(cfg, task, train, public=[])  # POST's transfer set is checked where it is drawn

    student_dir = Path(args.student) if args.student else default_student_dir(large_name)
    student_id = None
    if args.stages == "all":
        if not (student_dir / "config.json").is_file():  # the provider's one-off: not part of any ratio
            cmd_distill(compose([*base, "split=validation"]))
        report = json.loads((student_dir / "distill_report.json").read_text())
        info["distill"] = {k: v for k, v in report.items() if k != "curve"}
        # Which distillation made the student: its run folder (timestamped), else its folder and steps.
        student_id = report.get("output_dir") or f"{student_dir}@{report.get('steps')}"
        if args.task in report.get("data_tasks", []):
            raise SystemExit(f"the student at {student_dir} was distilled on {args.task}'s text; distil another one")

    tcfg = TransferConfig(public_size=args.public_size, steps=args.transfer_steps, batch_size=args.batch_size,
                          lr=args.transfer_lr, logits=args.transfer_logits)
    public, public_task, public_split = public_examples(tcfg, spec.name, cfg.get("data_dir"), int(cfg.seed))
    alpha_examples = task.split(tcfg.alpha_split)[: tcfg.alpha_limit]
    info.update(train_examples=len(train), eval_n=len(evaluation), public=f"{public_task}/{public_split}",
                public_n=len(public), manual_prompt=spec.manual_prompt, alpha_n=len(alpha_examples))

    tokenizer = load_tokenizer(large_name)
    device, dtype = cfg.model.get("device"), cfg.model.get("dtype")
    large_model = load_causal_lm(large_name, device, dtype)
    params = {"large": non_embedding_parameters(large_model)}
    if args.stages == "all":
        student_model = load_causal_lm(str(student_dir), device, dtype)
        params["student"] = non_embedding_parameters(student_model)
    info["non_embedding_parameters"] = params

    def flops(model: str, train_tokens: int, forward_tokens: int = 0) -> float:
        return 4.0 * params[model] * train_tokens + 2.0 * params[model] * forward_tokens

    large_cls = PromptedClassifier(large_model, tokenizer, spec, batch_size=16)

    def score(prompt: str | None = None, soft_prompt=None) -> dict:
        """Accuracy on the test examples and which ones were right (pairs a gain with the reference)."""
        right = large_cls.predict(evaluation, prompt, soft_prompt=soft_prompt) == np.array([e.label for e in evaluation])
        return {"accuracy": float(right.mean()), "correct": "".join("01"[int(r)] for r in right)}

    for stage, prompt in (("large zero-shot", None), ("large no instruction", "")):
        if not table.done(stage, None):
            t0 = time.perf_counter()
            result = score(prompt)
            table.add(stage, None, result.pop("accuracy"), time.perf_counter() - t0, **result)
    if "reference" not in table.info:  # the protocol's reference, chosen on validation, never on test
        scores = {kind: large_cls.evaluate(validation, text).accuracy for kind, text in untuned_prompts(spec).items()}
        kind = "manual" if scores["manual"] >= scores["zero-shot"] else "zero-shot"  # a tie goes to the manual prompt
        table.info["reference"] = {"kind": kind, "validation": scores, "validation_n": len(validation)}
        table.save_info()
    if "alpha_zero_shot" not in table.info:
        t0 = time.perf_counter()
        accuracy = large_cls.evaluate(alpha_examples).accuracy  # ZS of POST's alpha rule, shared by both epsilons
        table.info["alpha_zero_shot"] = {"accuracy": accuracy, "seconds": round(time.perf_counter() - t0, 1)}
        table.save_info()
    zero_shot_alpha = table.info["alpha_zero_shot"]["accuracy"]

    for epsilon in (None, args.epsilon):
        tag = "inf" if epsilon is None else f"{epsilon:g}"
        lr = args.lr if epsilon is None or args.dp_lr is None else args.dp_lr
        train_cfg = TrainConfig(local_steps=args.local_steps, batch_size=args.batch_size, lr=lr)
        privacy = PrivacyConfig(epsilon=epsilon)
        direct_tuner = SoftPromptTuner(large_model, tokenizer, spec, train_cfg)

        # Direct tuning of the large model: all examples pooled, the clients' total steps.
        if not table.done("direct (large, central)", tag):
            t0 = time.perf_counter()
            prompt = initial_prompt(PromptConfig(num_tokens=args.prompt_tokens), spec, tokenizer, large_model)
            plan = plan_dp(privacy, len(train), args.batch_size, steps) if privacy.enabled else None
            direct = direct_tuner.train(prompt, train, steps, seed=int(cfg.seed), plan=plan)
            train_s = time.perf_counter() - t0
            result = score(soft_prompt=direct.prompt)
            table.add("direct (large, central)", tag, result.pop("accuracy"), time.perf_counter() - t0,
                      compute_s=round(train_s, 1), flops=flops("large", direct.tokens), epsilon_spent=direct.epsilon,
                      delta=direct.delta, steps=steps, **result,
                      examples_seen=direct.examples_seen, noise_multiplier=direct.noise_multiplier)
        if args.stages == "direct":
            continue

        # Federated tuning on the student (Flower simulation through `flwr run`).
        run_dir = out / f"post_{args.task}_student_eps{tag}"
        if not table.current("student (federated)", tag, student=student_id):
            t0 = time.perf_counter()
            fl = cmd_run(compose([
            *base, "method=post", f"method.model={student_dir}", f"method.prompt.num_tokens={args.prompt_tokens}",
            f"method.train.local_steps={args.local_steps}", f"method.train.batch_size={args.batch_size}",
            f"method.train.lr={lr}", f"method.privacy.epsilon={'null' if epsilon is None else epsilon}",
            f"federation.num_clients={args.clients}", f"federation.rounds={args.rounds}",
            f"federation.eval_limit={args.eval_limit}", "federation.eval_references=false", "partition=iid",
            f"partition.k_shot={k_shot}", f"output_dir={run_dir}", f"resume={str(interrupted(run_dir)).lower()}",
            ]))
            costs = {"train-s": fl["client_train_s"], "tokens": fl["client_tokens"]}
            if costs["tokens"] is None:  # DP clients keep these to themselves: their own logs in the run folder
                costs = local_totals(run_dir)
            table.add("student (federated)", tag, fl["final_accuracy"], time.perf_counter() - t0,
                      compute_s=round(costs["train-s"], 3), flops=flops("student", int(costs["tokens"])),
                      epsilon_spent=fl["epsilon"], delta=fl.get("delta"),
                      epsilon_per_client=fl.get("epsilon_per_client"), delta_per_client=fl.get("delta_per_client"),
                      steps=steps, run_dir=str(run_dir), student=student_id)
        student_prompt = load_prompt(run_dir / "prompt.safetensors")[0]

        if not table.current("student prompt pasted on large", tag, student=student_id):
            t0 = time.perf_counter()
            result = score(soft_prompt=student_prompt)
            table.add("student prompt pasted on large", tag, result.pop("accuracy"), time.perf_counter() - t0,
                      student=student_id, **result)

        transfer_settings = {"transfer": {k: getattr(args, k) for k in TRANSFER_ARGS}, "student": student_id}
        if not table.current("POST transfer", tag, **transfer_settings):
            t0 = time.perf_counter()
            student_tuner = SoftPromptTuner(student_model, tokenizer, spec, train_cfg)
            init = (copy.deepcopy(student_prompt) if args.transfer_init == "student"  # the transfer edits init in place
                    else initial_prompt(PromptConfig(num_tokens=args.prompt_tokens), spec, tokenizer, large_model))
            moved = transfer_prompt(student_tuner, direct_tuner, student_prompt, init, public, tcfg, alpha_examples,
                                    chance=1.0 / spec.num_labels, batch_size=16, seed=int(cfg.seed),
                                    zero_shot=zero_shot_alpha)
            result = moved.pop("result")
            transfer_s = time.perf_counter() - t0
            scored = score(soft_prompt=result.prompt)
            # Forward token positions of the student's alpha evaluation (C), beside the transfer's own.
            alpha_tokens = sum(len(ids) + args.prompt_tokens for ids in student_tuner.encode(alpha_examples))
            fixed = result.fixed_tokens
            table.add("POST transfer", tag, scored.pop("accuracy"), time.perf_counter() - t0, compute_s=round(transfer_s, 1),
                      flops=flops("large", result.tokens, fixed["large"]) + flops("student", 0, fixed["student"] + alpha_tokens),
                      alpha=result.alpha, student_prompt_accuracy=moved.get("student_prompt_accuracy"),
                      losses=[round(x, 4) for x in result.losses], **transfer_settings, **scored)

    if args.stages == "direct":
        return {"rows": table.rows}
    summary = derive(table, args)
    total_wall = sum(r["wall_s"] for r in table.rows) + table.info["alpha_zero_shot"]["seconds"]
    reused_wall = sum(r["wall_s"] for r in table.rows if r.get("reused_from"))
    record = {**table.info, "rows": table.rows, "summary": summary, "total_wall_s": round(total_wall, 1),
              "reused_wall_s": round(reused_wall, 1)}
    (out / f"post_{args.task}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"post_{args.task}.md").write_text(markdown(record))
    table.path.unlink(missing_ok=True)
    print(json.dumps({"summary": summary, "output": str(out / f"post_{args.task}.md")}))
    return record


def gap_recovered(post: float, direct: float, base: float) -> float | None:
    """(POST - base) / (direct - base); None when direct tuning gained nothing over base."""
    gap = direct - base
    return round((post - base) / gap, 3) if abs(gap) > 1e-9 else None


def derive(table: Table, args) -> dict:
    """Gap recovered (against the protocol's reference and against POST's ZS) and cost ratio for each epsilon."""
    kind = table.info["reference"]["kind"]
    reference = table.done(REFERENCE_STAGE[kind], None)["accuracy"]
    manual = table.done("large zero-shot", None)["accuracy"]
    out = {}
    for tag in ("inf", f"{args.epsilon:g}"):
        direct, post = table.done("direct (large, central)", tag), table.done("POST transfer", tag)
        student = table.done("student (federated)", tag)
        out[tag] = {
            "reference": kind,
            "gap_recovered": gap_recovered(post["accuracy"], direct["accuracy"], reference),
            "gap_recovered_vs_manual": gap_recovered(post["accuracy"], direct["accuracy"], manual),
            "direct_gain": round(direct["accuracy"] - reference, 4), "post_gain": round(post["accuracy"] - reference, 4),
            "cost_ratio_time": round((student["compute_s"] + post["compute_s"]) / direct["compute_s"], 3),
            "cost_ratio_flops": round((student["flops"] + post["flops"]) / direct["flops"], 3),
        }
    return out


def markdown(record: dict) -> str:
    lines = [f"# POST on {record['task']} ({record['model']} as the large model)", "",
             f"Machine: {record['machine']}. Manual prompt: \"{record['manual_prompt']}\". Test examples: "
             f"{record['eval_n']}; training examples: {record['train_examples']}; public transfer set: "
             f"{record['public']} ({record['public_n']}). Steps (all clients together = direct): "
             f"{record['total_steps']}. Total wall time (all stages): {record['total_wall_s']:.0f} s"
             + (f", {record['reused_wall_s']:.0f} s of it in rows reused from an earlier table (marked *)"
                if record.get("reused_wall_s") else "") + ".", "",
             "| stage | epsilon | accuracy | wall s | compute s | GFLOP (est.) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(record["rows"], key=_row_order):
        notes = []
        if r.get("epsilon_spent") is not None:
            notes.append(f"eps spent {r['epsilon_spent']:.2f}")
        if r.get("alpha") is not None:
            notes.append(f"alpha {r['alpha']:.2f}, student+prompt on val {r['student_prompt_accuracy']}")
        flops = f"{r['flops'] / 1e9:.0f}" if r.get("flops") is not None else ""
        stage = r["stage"] + (" (label-word KL)" if r.get("transfer", {}).get("transfer_logits") == "labels" else "")
        stage += " *" if r.get("reused_from") else ""
        lines.append(f"| {stage} | {r['epsilon'] or '-'} | {r['accuracy']:.4f} | {r['wall_s']:.0f} | "
                     f"{r.get('compute_s', '')} | {flops} | {'; '.join(notes)} |")
    reference = record.get("reference")
    if reference:
        lines += ["", f"Reference (the better untuned prompt on {reference['validation_n']} validation examples): "
                      f"**{reference['kind']}** ({reference['validation']}); gains are over it."]
    lines += ["", "| epsilon | gap recovered | gap recovered vs the manual prompt (POST's ZS) | direct gain | POST gain "
                  "| cost ratio (time) | cost ratio (FLOPs) |", "|---|---|---|---|---|---|---|"]
    for tag, s in record["summary"].items():
        lines.append(f"| {tag} | {s['gap_recovered']} | {s.get('gap_recovered_vs_manual')} | {s['direct_gain']} | "
                     f"{s['post_gain']} | {s['cost_ratio_time']} | {s['cost_ratio_flops']} |")
    distill = record.get("distill") or {}
    if distill:
        lines += ["", f"Student: layers {distill.get('layers')} of {distill.get('teacher_layers')}, "
                      f"{distill.get('student_parameters')} parameters, distilled {distill.get('steps')} steps on "
                      f"{distill.get('data_tasks')} text in {distill.get('distill_s')} s (one-off, not in the ratios)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
