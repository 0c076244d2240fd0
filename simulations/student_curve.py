"""Where the student limits POST: the student's accuracy against distillation steps, in one command.

    python simulations/student_curve.py --task sst2 [--steps 400] [--at 0,25,50,100,200,400] [--out DIR]

One distillation (`fedprompt distill`'s student, teacher cache, losses and defaults; `--set distill.x=y` to
change them) is snapshotted at the steps of --at. For every snapshot, on the task's validation split:

- zero-shot: the student with the task's manual prompt, no soft prompt;
- prompt-tuned: a --prompt-tokens soft prompt tuned centrally on the student (the task's train split pooled,
  --tune-steps steps of batch --batch-size, lr --lr: the step count of POST's SST-2 table), one run per --seeds;

and the teacher (the large model) likewise, as the ceiling. Validation only: this is a diagnostic of the
student, not a result; the prompts' seeds vary, the distillation's does not (one distillation).
Writes student_curve_<task>.json and .png to --out (default simulations/results); rerunning resumes (snapshots
and finished evaluations are kept in --out/student_curve_<task>_work/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=400, help="distillation steps (distill.steps)")
    ap.add_argument("--at", default="0,25,50,100,200,400", help="steps to snapshot and evaluate (comma-separated)")
    ap.add_argument("--max-texts", type=int, default=1600, help="distillation texts (distill.data.max_texts)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--tune-steps", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seeds", default="0,1,2", help="prompt-tuning seeds")
    ap.add_argument("--eval-limit", type=int, default=None, help="validation examples (default: all)")
    ap.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    args = ap.parse_args(argv)
    args.at = sorted({int(s) for s in args.at.split(",")})
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.at[0] < 0 or args.at[-1] > args.steps:
        ap.error(f"--at must lie in [0, --steps={args.steps}], got {args.at}")
    return args


def mean_ci(values: list[float]) -> dict:
    from fedprompt.stats import seed_interval

    return {**seed_interval(values).to_dict(), "n": len(values), "values": values}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from fedprompt.commands.post import check_not_tuned_task, distill_tasks, distill_texts
    from fedprompt.config import compose, load_task_checked
    from fedprompt.data.leakage import check_disjoint
    from fedprompt.methods.post import PromptConfig, SoftPromptTuner, TrainConfig, initial_prompt
    from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer
    from fedprompt.models.distill import (
        DistillCheckpoint,
        DistillConfig,
        _is_embedding,
        build_student,
        default_layers,
        distill,
        distill_settings,
    )
    from fedprompt.models.teacher_cache import build_teacher_cache, cache_key
    from fedprompt.typed_config import from_node

    cfg = compose([f"task={args.task}", "progress=false", f"distill.steps={args.steps}",
                   f"distill.data.max_texts={args.max_texts}", *args.set])
    dcfg = from_node(DistillConfig, cfg.distill, "distill")
    check_not_tuned_task(dcfg.data, args.task)
    task = load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    validation = task.split("validation")[: args.eval_limit]
    train = task.split("train")
    sources = distill_tasks(dcfg.data, cfg.get("data_dir"))
    check_disjoint({f"the distillation text ({n} {dcfg.data.split})": t.split(dcfg.data.split) for n, t in sources.items()},
                   f"{spec.name} validation", validation)
    texts = distill_texts(dcfg.data, cfg.get("data_dir"), cfg.model.get("chat_format"), dcfg.seed, sources)

    out = Path(args.out)
    work = out / f"student_curve_{args.task}_work"
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "evaluations.json"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    done = json.loads(results_path.read_text()) if results_path.is_file() else {"settings": settings, "rows": {}}
    if done["settings"] != settings:
        raise SystemExit(f"{work} holds a curve made with other settings ({done['settings']}); delete it to start over")

    def record(key: str, **row) -> None:
        done["rows"][key] = row
        results_path.write_text(json.dumps(done, indent=2) + "\n")

    name, device, dtype = str(cfg.model.name), cfg.model.get("device"), cfg.model.get("dtype")
    tokenizer = load_tokenizer(name)
    lengths = tokenizer(texts, add_special_tokens=True)["input_ids"]
    texts = [t for t, ids in zip(texts, lengths) if len(ids) <= dcfg.max_length][: dcfg.data.max_texts]
    teacher = load_causal_lm(name, device, dtype)
    depth = teacher.config.num_hidden_layers
    layers = dcfg.layers if dcfg.layers is not None else default_layers(depth)
    student = build_student(teacher, layers).to(next(teacher.parameters()).device)
    snapshot = lambda step: work / f"student_step{step}.pt"  # noqa: E731
    # The embeddings and LM head stay the teacher's (frozen): a snapshot is the rest.
    trainable = lambda: {n: p.detach().clone() for n, p in student.named_parameters()  # noqa: E731
                         if not _is_embedding(student, p)}

    distill_info = done.get("distill")
    if not all(snapshot(s).is_file() for s in args.at):
        if not snapshot(0).is_file():
            torch.save(trainable(), snapshot(0))
        tc = dcfg.teacher_cache
        key = cache_key(name, str(teacher.dtype).removeprefix("torch."), texts, dcfg.max_length, tc.top_k,
                        dcfg.loss.temperature, dcfg.loss.a_cos > 0, tc.hidden_dtype)
        cache, cache_info = build_teacher_cache(teacher, tokenizer, texts, work / "teacher_cache", key,
                                                tc.batch_size or dcfg.batch_size,
                                                progress=lambda d, t: print(f"teacher cache {d}/{t}", flush=True))
        log_every = math.gcd(*[s for s in args.at if s > 0], args.steps)

        def progress(step: int, row: dict) -> None:
            print(f"distill step {step}: {row}", flush=True)
            if step in args.at:
                torch.save(trainable(), snapshot(step))

        checkpoint = DistillCheckpoint(work, 50, distill_settings(dcfg, texts, teacher=name, layers=list(layers)))
        checkpoint.check()
        report = distill(None, student, tokenizer, texts, dcfg, log_every=log_every, progress=progress, cache=cache,
                         checkpoint=checkpoint)
        checkpoint.remove()
        distill_info = {"layers": list(layers), "teacher_layers": depth, "texts": len(texts), "tokens": report.tokens,
                        "seconds": report.seconds, "teacher_cache_s": cache_info["seconds"],
                        "tasks": list(dcfg.data.tasks), "curve": report.curve}
        done["distill"] = distill_info
        results_path.write_text(json.dumps(done, indent=2) + "\n")

    train_cfg = TrainConfig(local_steps=args.tune_steps, batch_size=args.batch_size, lr=args.lr)

    def evaluate(model, label: str) -> None:
        classifier = PromptedClassifier(model, tokenizer, spec, batch_size=16)
        if f"{label}/zero-shot" not in done["rows"]:
            t0 = time.perf_counter()
            record(f"{label}/zero-shot", accuracy=classifier.evaluate(validation).accuracy,
                   seconds=round(time.perf_counter() - t0, 1))
        for seed in args.seeds:
            if f"{label}/tuned/{seed}" in done["rows"]:
                continue
            t0 = time.perf_counter()
            prompt = initial_prompt(PromptConfig(num_tokens=args.prompt_tokens), spec, tokenizer, model)
            SoftPromptTuner(model, tokenizer, spec, train_cfg).train(prompt, train, args.tune_steps, seed=seed)
            record(f"{label}/tuned/{seed}", accuracy=classifier.evaluate(validation, soft_prompt=prompt).accuracy,
                   seconds=round(time.perf_counter() - t0, 1))
        print(label, {k: v["accuracy"] for k, v in done["rows"].items() if k.startswith(label + "/")}, flush=True)

    for step in args.at:
        student.load_state_dict(torch.load(snapshot(step)), strict=False)
        student.eval().requires_grad_(False)
        evaluate(student, f"student@{step}")
    evaluate(teacher, "teacher")

    def summary(label: str) -> dict:
        rows = done["rows"]
        return {"zero_shot": rows[f"{label}/zero-shot"]["accuracy"],
                "tuned": mean_ci([rows[f"{label}/tuned/{s}"]["accuracy"] for s in args.seeds])}

    result = {"task": args.task, "split": "validation", "n": len(validation), "model": name, "settings": settings,
              "machine": "2-core AMD EPYC CPU (AVX2, float32), no GPU", "distill": distill_info,
              "student": {str(s): summary(f"student@{s}") for s in args.at}, "teacher": summary("teacher"),
              "chance": 1.0 / spec.num_labels}
    (out / f"student_curve_{args.task}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"student_curve_{args.task}.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in result["student"]]
    rows = list(result["student"].values())
    fig, ax = plt.subplots(figsize=(6, 4))
    tuned = [r["tuned"] for r in rows]
    ax.errorbar(steps, [t["mean"] for t in tuned], yerr=[[t["mean"] - t["ci95"][0] for t in tuned],
                [t["ci95"][1] - t["mean"] for t in tuned]], marker="o", capsize=3, label="student, prompt-tuned")
    ax.plot(steps, [r["zero_shot"] for r in rows], marker="s", label="student, manual prompt")
    ax.axhline(result["teacher"]["tuned"]["mean"], color="C2", ls="--", label="teacher, prompt-tuned")
    ax.axhline(result["teacher"]["zero_shot"], color="C3", ls=":", label="teacher, manual prompt")
    ax.axhline(result["chance"], color="grey", lw=0.8, label="chance")
    ax.set_xlabel("distillation steps")
    ax.set_ylabel(f"{result['task']} validation accuracy (n={result['n']})")
    ax.set_title(f"POST's student ({len(result['distill']['layers'])} of {result['distill']['teacher_layers']} layers) "
                 "vs distillation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
