"""FedDTPT's ablation table (issue 22) from the sweep folders simulations/ablations/feddtpt.sh writes: one row per
folder <config>_<row>/, with the final accuracy (mean and Student-t 95% CI over seeds), the gain over the reference
(the better untuned prompt on validation, paired bootstrap over the test examples, from the folder's
`fedprompt report`), the paired difference from the `frozen` row (the paper's server), and what the server did
(eps from the knee or the guard, final prompt length).

    python simulations/ablations/feddtpt_table.py --task trec
    -> simulations/results/ablations/feddtpt_<task>_table.md and .json

Any other set of sweeps, e.g. the partitions of the agreement config, paired with the IID row:

    python simulations/ablations/feddtpt_table.py --task trec --out feddtpt_trec_partitions --baseline iid \
        --row iid=feddtpt_trec_agreement_iid --row "Dirichlet 1.0=feddtpt_trec_agreement" \
        --row "Dirichlet 0.1=feddtpt_trec_agreement_alpha_0.1"

A row whose folder is missing or has no finished seed is listed as such; rows scored on different test examples
are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedprompt.results import completed_runs
from fedprompt.stats import paired_bootstrap

ABLATIONS = Path(__file__).resolve().parents[1] / "results" / "ablations"
ROWS = {  # folder suffix -> what the row changes (simulations/ablations/feddtpt.sh)
    "frozen": "the paper's server (frozen config)",
    "no_filter": "without the attention filter",
    "fixed_eps": "fixed eps = 0.15 instead of the elbow",
    "kmeans": "k-means (k = median prompt length) instead of DBSCAN",
    "fedavg": "FedAvg of word embeddings per position",
    "vote": "majority vote per word (eps ~ 0: identical words only)",
    "agreement": "ours: the filter scores agreement (chosen on validation)",
}


def server_facts(runs: list[dict]) -> dict:
    """What the server did in every round of the row's seeds (rounds.json's aggregation records)."""
    eps_from = {"knee": 0, "guard": 0, "fixed or none": 0}
    lengths = []
    for run in runs:
        rows = json.loads((Path(run["folder"]) / "rounds.json").read_text())
        for row in rows[1:]:
            aggregation = row.get("aggregation") or {}
            if aggregation.get("eps_floored"):
                eps_from["guard"] += 1
            elif aggregation.get("knee_found"):
                eps_from["knee"] += 1
            else:
                eps_from["fixed or none"] += 1
        lengths.append(rows[-1].get("prompt_length"))
    return {"eps_from": eps_from, "final_prompt_words": lengths}


def row_entry(name: str, folder: Path, runs: list[dict], baseline: list[dict] | None) -> dict:
    report = json.loads((folder / "report" / "report.json").read_text())[0]
    entry = {"row": name, "change": ROWS.get(name, name), "folder": str(folder), "seeds": report["seeds"],
             "final_accuracy": report["final_accuracy"], "reference": report["reference"], "gain": report["gain"],
             "queries_per_client_round": float(np.mean([r["queries_per_client_round"] for r in runs])),
             "model_dtype": sorted({str(r.get("model_dtype")) for r in runs}),  # None: a run older than the field
             **server_facts(runs)}
    if baseline and runs is not baseline:
        def correct(run: dict) -> np.ndarray:
            return run["predictions"]["final"] == run["predictions"]["label"]

        paired = {int(r["config.seed"]): r for r in baseline}
        common = [r for r in runs if int(r["config.seed"]) in paired]
        if common:
            mine = np.stack([correct(r) for r in common])
            theirs = np.stack([correct(paired[int(r["config.seed"])]) for r in common])
            entry["vs_baseline"] = paired_bootstrap(mine, theirs).to_dict()
    return entry


def interval(stat: dict | None, points: bool = False) -> str:
    if not stat:
        return "-"
    scale, fmt = (100, "{:+.1f}") if points else (1, "{:.3f}")
    text = fmt.format(stat["mean"] * scale)
    if stat.get("ci95"):
        low, high = (fmt.format(v * scale) for v in stat["ci95"])
        text += f" [{low}, {high}]"
    return text


def markdown(task: str, entries: list[dict], missing: list[str], baseline: str) -> str:
    lines = [f"FedDTPT ablations, {task} (test; seeds as listed; gains in points, paired 95% CI)", "",
             f"| row | seeds | final (mean [95% CI]) | reference | gain over the reference | vs {baseline} | "
             "eps: knee / guard / fixed or n/a | final prompt words |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        ref = e["reference"]
        eps = e["eps_from"]
        lines.append(f"| {e['change']} | {len(e['seeds'])} | {interval(e['final_accuracy'])} | "
                     f"{ref['kind']} {ref['accuracy']:.3f} | {interval(e['gain'], True)} | "
                     f"{interval(e.get('vs_baseline'), True)} | {eps['knee']} / {eps['guard']} / {eps['fixed or none']} | "
                     f"{' / '.join(str(n) for n in e['final_prompt_words'])} |")
    if missing:
        lines += ["", "Not finished: " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--results", type=Path, default=ABLATIONS)
    parser.add_argument("--config", default=None, help="the folders' prefix (default feddtpt_<task>)")
    parser.add_argument("--row", action="append", default=[], metavar="LABEL=FOLDER",
                        help="a row and its sweep folder under --results (repeatable; default: the ablation rows)")
    parser.add_argument("--baseline", default="frozen", help="the row every other is paired with (default frozen)")
    parser.add_argument("--out", default=None, help="the table's name under --results (default <prefix>_table)")
    args = parser.parse_args(argv)
    prefix = args.config or f"feddtpt_{args.task}"
    if args.row:
        if any("=" not in r for r in args.row):
            sys.exit(f"--row takes LABEL=FOLDER, got {[r for r in args.row if '=' not in r]}")
        folders = dict(r.split("=", 1) for r in args.row)
    else:
        folders = {name: f"{prefix}_{name}" for name in ROWS}
    found = {name: completed_runs(args.results / folder) for name, folder in folders.items()}
    missing = [name for name, runs in found.items() if not runs]
    done = {name: runs for name, runs in found.items() if runs}
    if not done:
        sys.exit(f"no finished row under {args.results} ({', '.join(folders.values())}); "
                 f"run simulations/ablations/feddtpt.sh {args.task}")
    scored_on = {r["eval_ids_sha256"] for runs in done.values() for r in runs}
    if len(scored_on) > 1:
        sys.exit(f"the rows were scored on different test examples ({len(scored_on)} id sets): not one table")
    entries = [row_entry(name, args.results / folders[name], runs, done.get(args.baseline)) for name, runs in done.items()]
    text = markdown(args.task, entries, missing, ROWS.get(args.baseline, args.baseline) if args.baseline in done else "-")
    out = args.results / (args.out or f"{prefix}_table")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"task": args.task, "rows": entries, "missing": missing}, indent=2) + "\n")
    print(text)
    return {"rows": entries, "missing": missing}


if __name__ == "__main__":
    main()
