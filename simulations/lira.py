"""LiRA membership inference against soft prompts tuned as a POST client tunes them (issue 23, item 4).

    python simulations/lira.py [--task sst2] [--model student] [--pool 64] [--shadows 8] [--epsilons inf 8 1]
                               [--seed 0 [1 2 ...]]

The target is what a POST client uploads: its soft prompt after local tuning (with DP-SGD at epsilon, or
without at inf), which the server sees before any averaging. A pool of --pool examples from the task's train
split plays the client's data; --shadows prompts are each tuned with the client's recipe (--steps steps of
batch --batch-size, lr --lr, --prompt-tokens tokens from the manual prompt's text) on a random half of it,
every example in exactly half of them (fedprompt.privacy.lira). Each shadow in turn is the target, the rest
are the attacker's shadows (online LiRA, fixed variance): AUC, its 95% CI (bootstrap over pool examples)
and TPR at 1% FPR per epsilon. ``--overfit-steps N`` adds a row "inf_overfit": no DP and N steps, a prompt
meant to memorise, to show the attack works where there is something to find.

Each --seed draws its own pool (examples, halves, training seeds). With several, the attack runs within each
pool and all pools' pairs go into one ROC (fedprompt.privacy.lira.evaluate_pools): the same client recipe,
more examples, a narrower interval, with each pool's own AUC beside it.

Writes --out/lira_<task>.json ({"auc": {"inf": x, "8": x, ...}, "auc_ci95": ..., "tpr_at_1pct_fpr": ...,
"shadows": S, "targets": S, ...}) and lira_<task>_roc.png. Each shadow's confidences are kept in --work
(default --out/lira_<task>_work, one seed_<k> folder per pool), so an interrupted run resumes; change a setting
and they are recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
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
    ap.add_argument("--model", default="student", help="the model the client tunes on: 'student' (POST) or a model name")
    ap.add_argument("--pool", type=int, default=64, help="the client's examples (train split, seeded sample)")
    ap.add_argument("--shadows", type=int, default=8, help="even, >= 4; every example is in half of them")
    ap.add_argument("--epsilons", nargs="+", default=["inf", "8", "1"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--overfit-steps", type=int, default=0, help="> 0: add a non-private prompt tuned this long")
    ap.add_argument("--seed", type=int, nargs="+", default=[0],
                    help="one pool per seed (its examples, halves and training seeds); several are pooled into one ROC")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "simulations" / "results" / "headline"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--set", action="append", default=[], help="extra fedprompt config overrides (model.device=cuda)")
    args = ap.parse_args(argv)
    for eps in args.epsilons:
        if eps != "inf" and not float(eps) > 0:
            ap.error(f"--epsilons: each is 'inf' or a number > 0, got {eps}")
    if len(set(args.seed)) != len(args.seed):
        ap.error(f"--seed: each pool needs its own seed, got {args.seed}")
    if args.shadows < 4 or args.shadows % 2:
        ap.error(f"--shadows must be even and >= 4, got {args.shadows}")
    if args.pool < 2 * args.batch_size:
        ap.error(f"--pool {args.pool} leaves halves of {args.pool // 2} examples, fewer than --batch-size "
                 f"{args.batch_size}: DP's Poisson rate would exceed 1")
    return args


def rows(args) -> dict[str, dict]:
    """Each row's training: name -> (epsilon or None, steps)."""
    out = {eps: {"epsilon": None if eps == "inf" else float(eps), "steps": args.steps} for eps in args.epsilons}
    if args.overfit_steps > 0:
        out["inf_overfit"] = {"epsilon": None, "steps": args.overfit_steps}
    return out


def settings_key(args, row: dict, model: str, seed: int) -> str:
    keys = dict(task=args.task, model=model, pool=args.pool, shadows=args.shadows, batch=args.batch_size, lr=args.lr,
                tokens=args.prompt_tokens, seed=seed, set=args.set, **row)
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from fedprompt.config import compose, load_task_checked
    from fedprompt.methods.post import PromptConfig, SoftPromptTuner, TrainConfig, initial_prompt
    from fedprompt.models import load_causal_lm, load_tokenizer
    from fedprompt.models.distill import resolve_model
    from fedprompt.privacy.dp import PrivacyConfig, plan_dp
    from fedprompt.privacy.lira import balanced_halves, evaluate_pools, logit_confidence

    cfg = compose([f"task={args.task}", *args.set])
    task = load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    train = task.split("train")
    if len(train) < args.pool:
        raise SystemExit(f"--pool {args.pool} is more than {args.task}'s {len(train)} training rows")
    name = resolve_model(args.model, str(cfg.model.name))  # refuses a missing student before any work
    out = Path(args.out)
    work = Path(args.work) if args.work else out / f"lira_{args.task}_work"

    tokenizer = load_tokenizer(name)
    model = load_causal_lm(name, cfg.model.get("device"), cfg.model.get("dtype"))
    tuner = SoftPromptTuner(model, tokenizer, spec, TrainConfig(local_steps=args.steps, batch_size=args.batch_size,
                                                                lr=args.lr))

    def shadow_confidences(seed: int, row_name: str, row: dict) -> tuple[np.ndarray, np.ndarray, float]:
        """One pool's (S, N) confidences and membership, and the largest epsilon its shadows reached."""
        pick = np.random.default_rng(seed).choice(len(train), args.pool, replace=False)
        pool = [train[i] for i in sorted(pick)]
        labels = np.array([e.label for e in pool])
        members = balanced_halves(args.shadows, args.pool, seed)
        encoded = tuner.encode(pool)
        key = settings_key(args, row, name, seed)
        folder = work / f"seed_{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        phi, reached = np.zeros((args.shadows, args.pool)), []
        for s in range(args.shadows):
            path = folder / f"{row_name}_{s}.npz"
            if path.is_file() and str(np.load(path)["key"]) == key:
                saved = np.load(path)
                phi[s], eps = saved["phi"], float(saved["epsilon"])
            else:
                half = [pool[i] for i in np.flatnonzero(members[s])]
                prompt = initial_prompt(PromptConfig(num_tokens=args.prompt_tokens), spec, tokenizer, model)
                plan = None
                if row["epsilon"] is not None:
                    plan = plan_dp(PrivacyConfig(epsilon=row["epsilon"]), len(half), args.batch_size, row["steps"])
                result = tuner.train(prompt, half, row["steps"], seed=seed * 1000 + s, plan=plan)
                with torch.no_grad():
                    logits = torch.cat([tuner.label_logits(prompt, *tuner.pad(encoded[i : i + 32]))
                                        for i in range(0, len(encoded), 32)]).cpu().numpy()
                phi[s] = logit_confidence(logits, labels)
                eps = float("inf") if result.epsilon is None else float(result.epsilon)
                np.savez(path, phi=phi[s], epsilon=eps, key=key)
                train_acc = float(((logits.argmax(1) == labels) & members[s]).sum() / members[s].sum())
                print(f"seed {seed} {row_name} shadow {s + 1}/{args.shadows}: {result.seconds:.0f} s, "
                      f"epsilon {eps:.3g}, train accuracy {train_acc:.3f}", flush=True)
            reached.append(eps)
        return phi, members, max(reached)

    start = time.perf_counter()
    results, reached = {}, {}
    for row_name, row in rows(args).items():
        pools = [shadow_confidences(seed, row_name, row) for seed in args.seed]
        results[row_name] = evaluate_pools([p[0] for p in pools], [p[1] for p in pools], reps=args.bootstrap,
                                           seed=args.seed[0])
        reached[row_name] = max(p[2] for p in pools)
        print(f"{row_name}: AUC {results[row_name].auc:.3f} {results[row_name].auc_ci95}, "
              f"TPR@1%FPR {results[row_name].tpr_at_1pct_fpr:.3f}, per pool {results[row_name].pool_aucs}", flush=True)

    record = {
        "auc": {k: r.auc for k, r in results.items()},
        "auc_ci95": {k: list(r.auc_ci95) for k, r in results.items()},
        "tpr_at_1pct_fpr": {k: r.tpr_at_1pct_fpr for k, r in results.items()},
        "auc_per_pool": {k: r.pool_aucs for k, r in results.items()},
        "seeds": args.seed, "shadows": args.shadows, "targets": args.shadows * len(args.seed), "pool": args.pool,
        "pairs": {k: r.pairs for k, r in results.items()},
        "epsilon_reached_max": reached,
        "delta": min(1e-5, 1.0 / (10 * (args.pool // 2))),
        "model": name, "task": args.task, "split": "train",
        "recipe": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "prompt_tokens": args.prompt_tokens,
                   "overfit_steps": args.overfit_steps},
        "attack": "online LiRA, fixed variance, leave-one-shadow-out within each pool (fedprompt.privacy.lira)",
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python simulations/lira.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": " ".join(filter(None, (platform.machine(), platform.processor(), f"cpus={os.cpu_count()}"))),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lira_{args.task}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(results, out / f"lira_{args.task}_roc.png", args.task)
    return record


def plot(results: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, r in results.items():
        ax.plot(r.fpr, r.tpr, label=f"eps {name}: AUC {r.auc:.3f}")
    ax.plot([1e-3, 1], [1e-3, 1], "k:", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=f"LiRA on {task} soft prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
