"""RAPT's privacy-utility curves: token recovery by nearest-neighbour inversion, and the accuracy of RAPT
with and without privatized-token reconstruction, over a grid of eta, per task.

    python simulations/rapt_curves.py                                   # SST-2 and TREC, 6 etas (~1 h on 2 cores)
    python simulations/rapt_curves.py --tasks sst2 --etas 30 --train-size 64 --eval-size 64 --steps 5
    python simulations/rapt_curves.py method.train.lr=0.01 model.dtype=float32   # any config override

For every task and eta (all in plain Python, no Flower; the federated form is ``fedprompt run method=rapt``):

1. the user side privatizes ``--train-size`` class-balanced training examples and ``--eval-size`` examples
   of ``--eval-split``, each as [plain tokens + text] (one seed for every eta, so a smaller eta only scales
   the same noise draws up and the curves are paired across eta);
2. the attack: nearest-neighbour inversion of the privatized training texts (plain tokens excluded):
   ``recovered@1`` (the fraction of original tokens recovered) and ``recovered@5``;
3. ``untrained``: the initial soft prompt (the manual prompt's embeddings) on the privatized inputs;
   ``none``: prompt tuning on the privatized texts (the same privatized text tokens, no plain tokens);
   ``reconstruction``: RAPT (plain tokens + reconstruction head, loss = task + reconstruction). Both trained
   variants see the same batches in the same order, so their difference is the reconstruction alone.

Writes ``<out>/rapt_curves.json`` (rewritten after every run, so an interrupted sweep keeps its rows),
``rapt_curves.md`` (tables) and ``rapt_curves.png`` (privacy-utility plot).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedprompt.config import compose  # noqa: E402
from fedprompt.data import sample_balanced  # noqa: E402
from fedprompt.methods.rapt import PrivateExample, RAPTConfig, RAPTTrainer, privatize_examples  # noqa: E402
from fedprompt.models import load_causal_lm, load_tokenizer  # noqa: E402
from fedprompt.privacy.attacks import token_recovery  # noqa: E402
from fedprompt.privacy.dchi import DChiPrivatizer, output_vocabulary  # noqa: E402
from fedprompt.runs.data import load_task_and_spec  # noqa: E402

VARIANTS = ("none", "reconstruction")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "trec"])
    parser.add_argument("--etas", nargs="+", type=float, default=[20, 25, 30, 35, 40, 60])
    parser.add_argument("--train-size", type=int, default=320, help="privatized training examples per task")
    parser.add_argument("--eval-size", type=int, default=300, help="privatized evaluation examples per task")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: method.train.steps)")
    parser.add_argument("--out", default="simulations/results/rapt_curves")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is much faster on a machine busy with other jobs")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished (task, eta) rows of <out>/rapt_curves.json and run only the others "
                             "(same seeds, so the resumed rows are those the interrupted sweep would have made)")
    parser.add_argument("--replot", action="store_true",
                        help="only rebuild the summary, markdown and PNG from <out>/rapt_curves.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. method.train.lr=0.01")
    return parser.parse_args(argv)


def split_off_plain(examples: list[PrivateExample], plain: int) -> list[PrivateExample]:
    """The same privatized examples without their plain tokens (the mechanism noises each token alone,
    so this is distributed exactly as privatizing the text without them)."""
    return [PrivateExample(e.ids[plain:], e.label, e.pair_ids) for e in examples]


def finished(rows: list[dict]) -> set[tuple[str, float]]:
    """The (task, eta) pairs of ``rows`` that are complete: the clean row, or a private eta's RAPT row."""
    return {(r["task"], float(r["eta"])) for r in rows
            if math.isinf(float(r["eta"])) or r["variant"] == "reconstruction"}


def run_task(task_name: str, args, overrides: list[str], model, tokenizer, privatizer, record,
             done: frozenset = frozenset()) -> None:
    cfg = compose(["method=rapt", f"task={task_name}", *overrides])
    method = RAPTConfig.from_dict(cfg.method)
    method_none = RAPTConfig.from_dict({**method.to_dict(), "reconstruction": {**method.to_dict()["reconstruction"], "enabled": False}})
    task, spec = load_task_and_spec(cfg)
    seed, m = int(cfg.seed), method.reconstruction.plain_tokens
    train = sample_balanced(task.split("train"), args.train_size, spec.num_labels, seed=seed)
    rng = np.random.default_rng(seed + 1)
    pool = task.split(args.eval_split)
    evaluation = [pool[i] for i in np.sort(rng.choice(len(pool), size=min(args.eval_size, len(pool)), replace=False))]
    steps = method.train.steps if args.steps is None else args.steps
    base = dict(task=task_name, train_n=len(train), eval_n=len(evaluation), eval_split=args.eval_split, steps=steps,
                batch_size=method.train.batch_size, plain_tokens=m, prompt_tokens=method.prompt.num_tokens,
                manual_prompt=spec.manual_prompt)
    clean = RAPTTrainer(model, tokenizer, spec, method_none, seed)
    max_tokens, vocab = method.train.max_text_tokens, method.reconstruction.plain_vocab
    clean_eval, _ = privatize_examples(evaluation, tokenizer, _Identity(privatizer.allowed), max_tokens, seed)
    if (task_name, math.inf) not in done:
        record({**base, "eta": math.inf, "variant": "untrained", "accuracy": clean.accuracy(clean_eval)})
    for eta in args.etas:
        if (task_name, float(eta)) in done:
            continue
        privatizer.eta = float(eta)
        start = time.perf_counter()
        private_train, raw_train = privatize_examples(train, tokenizer, privatizer, max_tokens, seed + 2, m, vocab)
        private_eval, _ = privatize_examples(evaluation, tokenizer, privatizer, max_tokens, seed + 3, m, vocab)
        leak = token_recovery([r[m:] for r in raw_train[: len(train)]], [e.ids[m:] for e in private_train],
                              privatizer.embedding)
        row = {**base, "eta": eta, "expected_noise_norm": privatizer.expected_noise_norm(), **leak,
               "privatize_s": round(time.perf_counter() - start, 2)}
        trainers = {"none": RAPTTrainer(model, tokenizer, spec, method_none, seed),
                    "reconstruction": RAPTTrainer(model, tokenizer, spec, method, seed)}
        data = {"none": (split_off_plain(private_train, m), split_off_plain(private_eval, m)),
                "reconstruction": (private_train, private_eval)}
        labels = np.array([e.label for e in evaluation])
        record({**row, "variant": "untrained", "accuracy": trainers["none"].accuracy(data["none"][1])})
        correct = {}
        for variant in VARIANTS:
            trainer = trainers[variant]
            trainer.add(data[variant][0])
            stats = trainer.train(steps)
            start = time.perf_counter()
            correct[variant] = (trainer.predict(data[variant][1]) == labels).astype(float)
            result = {"accuracy": float(correct[variant].mean()), "eval_s": round(time.perf_counter() - start, 2)}
            if variant == "reconstruction":  # paired over the same examples: the gain and its standard error
                diff = correct["reconstruction"] - correct["none"]
                result.update(gain_points=float(100 * diff.mean()), gain_se_points=float(100 * diff.std(ddof=1) / np.sqrt(diff.size)))
            record({**row, "variant": variant, **result, **{k: round(v, 4) for k, v in stats.items()}})


class _Identity:
    """No privatization (the clean reference row)."""

    def __init__(self, allowed) -> None:
        self.allowed = allowed

    def privatize_ids(self, sequences, seed):
        return [list(s) for s in sequences]


def summarize(rows: list[dict]) -> dict:
    """Per task: at the largest eta whose recovered@1 <= 0.30, reconstruction minus none (accuracy points)."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        runs = {(r["eta"], r["variant"]): r for r in rows if r["task"] == task}
        private = sorted({eta for eta, _ in runs if not math.isinf(eta)})
        eligible = [eta for eta in private if runs.get((eta, "untrained"), {}).get("recovered@1", 1.0) <= 0.30
                    and (eta, "none") in runs and (eta, "reconstruction") in runs]
        entry = {"clean_untrained_accuracy": runs.get((math.inf, "untrained"), {}).get("accuracy")}
        if eligible:
            eta = max(eligible)
            rec = runs[(eta, "reconstruction")]
            entry.update(eta_at_30pct=eta, recovered_at_eta=runs[(eta, "untrained")]["recovered@1"],
                         accuracy_none=runs[(eta, "none")]["accuracy"], accuracy_reconstruction=rec["accuracy"],
                         gain_points=round(rec["gain_points"], 2), gain_se_points=round(rec["gain_se_points"], 2),
                         acceptance_met=bool(rec["gain_points"] >= 2.0))
        out[task] = entry
    return out


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    payload = {**meta, "rows": rows, "summary": summarize(rows)}
    (out / "rapt_curves.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"# RAPT privacy-utility curves\n\n{meta['command']}\n"]
    if meta.get("resumed_from"):
        lines.insert(1, f"(resuming rows of: {meta['resumed_from']['command']})\n")
    for task in sorted({r["task"] for r in rows}):
        runs = {(r["eta"], r["variant"]): r for r in rows if r["task"] == task}
        etas = sorted({eta for eta, _ in runs}, reverse=True)
        first = next(r for r in rows if r["task"] == task)
        lines += [f"\n## {task}\n",
                  f"{first['train_n']} privatized training examples, {first['steps']} steps of batch {first['batch_size']}, "
                  f"{first['plain_tokens']} plain tokens, {first['prompt_tokens']} prompt vectors; accuracy on "
                  f"{first['eval_n']} privatized {first['eval_split']} examples (%). Manual prompt: \"{first['manual_prompt']}\"\n",
                  "| eta | E‖z‖ | recovered@1 | recovered@5 | untrained | prompt tuning | RAPT (reconstruction) "
                  "| gain ± SE (points) | head accuracy |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for eta in etas:
            u, n, r = runs.get((eta, "untrained"), {}), runs.get((eta, "none"), {}), runs.get((eta, "reconstruction"), {})
            cell = lambda row, key, pct=True: "" if key not in row else (f"{100 * row[key]:.1f}" if pct else f"{row[key]:.1f}")  # noqa: E731
            gain = f"{r['gain_points']:+.1f} ± {r['gain_se_points']:.1f}" if "gain_points" in r else ""
            lines.append(f"| {eta:g} | {cell(u, 'expected_noise_norm', False)} | {cell(u, 'recovered@1')} | {cell(u, 'recovered@5')} "
                         f"| {cell(u, 'accuracy')} | {cell(n, 'accuracy')} | {cell(r, 'accuracy')} | {gain} | {cell(r, 'rec_accuracy')} |")
    (out / "rapt_curves.md").write_text("\n".join(lines) + "\n")
    plot(out / "rapt_curves.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    styles = {"untrained": ("grey", "s", "untrained prompt"), "none": ("tab:blue", "o", "prompt tuning"),
              "reconstruction": ("tab:red", "^", "RAPT (+ reconstruction)")}
    for ax, task in zip(axes[0], tasks):
        private = [r for r in rows if r["task"] == task and not math.isinf(r["eta"])]
        for variant, (color, marker, label) in styles.items():
            pts = sorted((100 * r["recovered@1"], 100 * r["accuracy"], r["eta"]) for r in private if r["variant"] == variant)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
                if variant == "reconstruction":
                    for x, y, eta in pts:
                        ax.annotate(f"η={eta:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        clean = [r for r in rows if r["task"] == task and math.isinf(r["eta"])]
        if clean:
            ax.axhline(100 * clean[0]["accuracy"], color="grey", linestyle="--", label="manual prompt, no privatization")
        ax.axvline(30, color="black", linestyle=":", linewidth=0.8)
        ax.set_xlabel("tokens recovered by NN inversion (%)  ← more private")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{task}: RAPT privacy-utility")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        payload = json.loads((out / "rapt_curves.json").read_text())
        rows, meta = payload.pop("rows"), {k: v for k, v in payload.items() if k != "summary"}
        write_outputs(out, rows, meta)
        print(json.dumps({"summary": summarize(rows), "out": str(out)}))
        return 0
    base_cfg = compose(["method=rapt", *args.overrides])
    method = RAPTConfig.from_dict(base_cfg.method)
    model_name = str(base_cfg.model.name)
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, base_cfg.model.get("device"), base_cfg.model.get("dtype"))
    # The user side privatizes with the service model's input embeddings (method.privatize.embedding=null).
    embedding = model.get_input_embeddings().weight.detach().float()
    privatizer = DChiPrivatizer(embedding, 1.0, output_vocabulary(tokenizer, embedding.shape[0]),
                                chunk_size=method.privatize.chunk_size, shortlist=method.privatize.shortlist)
    previous: dict = {}
    if args.resume and (out / "rapt_curves.json").is_file():
        previous = json.loads((out / "rapt_curves.json").read_text())
    done = frozenset(finished(previous.get("rows", [])))
    rows: list[dict] = [r for r in previous.get("rows", []) if (r["task"], float(r["eta"])) in done]
    meta = {"command": "python simulations/rapt_curves.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": model_name, "dtype": str(next(model.parameters()).dtype), "method": method.to_dict(),
            "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if previous:  # the table says which runs made it
        meta["resumed_from"] = {k: previous.get(k) for k in ("command", "started", "elapsed_s", "threads")}
    start = time.perf_counter()

    def record(row: dict) -> None:
        rows.append(row)
        meta["elapsed_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: row[k] for k in ("task", "eta", "variant", "accuracy") if k in row}
                         | {k: row[k] for k in ("recovered@1",) if k in row}), flush=True)
        write_outputs(out, rows, meta)

    for task in args.tasks:
        run_task(task, args, list(args.overrides), model, tokenizer, privatizer, record, done)
    print(json.dumps({"summary": summarize(rows), "elapsed_s": meta["elapsed_s"], "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
