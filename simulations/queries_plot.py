"""FedDTPT, BDPL and FedAvg-BBT at equal query budgets (issue 22): the global prompt's test accuracy against the
cumulative black-box queries every client spent on training, mean and Student-t 95% interval over seeds, one
line per method, with the reference (the better untuned prompt, chosen on validation) on the same examples.

    bash simulations/ablations/feddtpt.sh trec frozen agreement
    RESULTS=simulations/results/ablations bash simulations/headline/run.sh bdpl_trec fedavg_bbt_trec
    python simulations/queries_plot.py --task trec

It reads the sweep folders (simulations/results/ablations/<name>/, one run folder per seed, each with rounds.json
and summary.json: all four from one machine) and writes queries_<task>.png and .json beside them. A method
whose folder is missing or unfinished is left out and named; two methods scored on different test examples are
refused. The frozen configs (simulations/headline/) give every method the same clients, split, rounds and a
client round of at most 300 queries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedprompt.results import completed_runs, query_curve
from fedprompt.stats import seed_interval

ABLATIONS = Path(__file__).resolve().parent / "results" / "ablations"
METHODS = {  # headline sweep name (with the task) -> legend
    "feddtpt_{task}_frozen": "FedDTPT (paper's server)",
    "feddtpt_{task}_agreement": "FedDTPT (agreement filter)",
    "bdpl_{task}": "BDPL-FedAvg",
    "fedavg_bbt_{task}": "FedAvg-BBT",
}


def method_curve(folder: Path) -> dict | None:
    """Per evaluated round over the finished seeds of a sweep folder: the mean cumulative training queries and the
    accuracy's mean and 95% CI, plus what the runs were scored on. None when no seed finished."""
    runs = completed_runs(folder)
    if not runs:
        return None
    curves = [query_curve(Path(r["folder"])) for r in runs]
    if len({len(c) for c in curves}) > 1:
        sys.exit(f"{folder}: the seeds evaluated different numbers of rounds ({[len(c) for c in curves]}); "
                 "finish or rerun the short one")
    points = [{"queries": float(np.mean([c[i][0] for c in curves])),
               "accuracy": seed_interval([c[i][1] for c in curves]).to_dict()} for i in range(len(curves[0]))]
    return {
        "folder": str(folder),
        "seeds": sorted(int(r["config.seed"]) for r in runs),
        "eval_ids_sha256": sorted({r["eval_ids_sha256"] for r in runs}),
        "reference": {"kind": runs[0]["reference_kind"],
                      "accuracy": float(np.mean([r["reference_accuracy"] for r in runs]))},
        "queries_per_client_round": float(np.mean([r["queries_per_client_round"] for r in runs])),
        "points": points,
    }


def plot(task: str, methods: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curve in methods.items():
        x = [p["queries"] for p in curve["points"]]
        mean = [p["accuracy"]["mean"] for p in curve["points"]]
        line, = ax.plot(x, mean, marker="o", label=f"{label} ({len(curve['seeds'])} seeds)")
        if all(p["accuracy"]["ci95"] for p in curve["points"]):
            ax.fill_between(x, [p["accuracy"]["ci95"][0] for p in curve["points"]],
                            [p["accuracy"]["ci95"][1] for p in curve["points"]], color=line.get_color(), alpha=0.12)
    reference = next(iter(methods.values()))["reference"]
    ax.axhline(reference["accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"reference: {reference['kind']} (chosen on validation)")
    ax.set_title(f"{task}: test accuracy against training queries (mean, 95% CI over seeds)", fontsize=9)
    ax.set_xlabel("cumulative black-box queries (training, all clients)")
    ax.set_ylabel("test accuracy of the global prompt")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="trec", help="the task of the headline folders (default trec)")
    parser.add_argument("--results", type=Path, default=ABLATIONS, help="the folder holding the sweeps")
    args = parser.parse_args(argv)
    methods, missing = {}, []
    for pattern, label in METHODS.items():
        folder = args.results / pattern.format(task=args.task)
        curve = method_curve(folder)
        if curve is None:
            missing.append(str(folder))
        else:
            methods[label] = curve
    if not methods:
        sys.exit(f"no finished headline run for {args.task} under {args.results}; run the commands of this script's docstring first")
    scored_on = {sha for curve in methods.values() for sha in curve["eval_ids_sha256"]}
    if len(scored_on) > 1:
        sys.exit(f"the methods were scored on different test examples ({sorted(scored_on)}): not comparable")
    references = {(c["reference"]["kind"], round(c["reference"]["accuracy"], 9)) for c in methods.values()}
    if len(references) > 1:  # one dashed line stands for every method's reference
        sys.exit(f"the methods measured different references ({sorted(references)}): same examples, different "
                 "scores means a different model or precision; rerun them on one machine")
    stem = args.results / f"queries_{args.task}"
    plot(args.task, methods, stem.with_suffix(".png"))
    out = {"task": args.task, "methods": methods, "missing": missing,
           "command": f"python simulations/queries_plot.py --task {args.task}"}
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    for label, curve in methods.items():
        final = curve["points"][-1]
        ci = final["accuracy"]["ci95"]
        print(f"{label:28s} {final['queries']:8.0f} queries  accuracy {final['accuracy']['mean']:.3f}"
              + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    if missing:
        print("not finished (left out): " + ", ".join(missing))
    print(f"wrote {stem.with_suffix('.png')} and {stem.with_suffix('.json')}")
    return out


if __name__ == "__main__":
    main()
