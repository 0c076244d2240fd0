"""POST under the result protocol: simulations/post_table.py once per seed, then the mean over seeds with 95%
intervals, in simulations/results/headline/post_<task>.json (and .md).

    python simulations/post_headline.py --task agnews [--seeds 0 1 2] [any of post_table.py's options]
    python simulations/post_headline.py --task agnews --summary-only   # the headline again, from finished seeds

Each seed's table lives in <out>/post_<task>/seed_<s>/ and resumes like post_table.py's (a stopped run loses
only the stage it was in). What the JSON holds, per epsilon ("inf" and --epsilon):

- ``gap_recovered``: (POST - reference) / (direct tuning - reference), the mean over seeds, and
  ``gap_recovered_ci95`` its Student-t interval over seeds. The reference is the protocol's: the better of the
  manual prompt and no instruction on validation (post_table.py). ``gap_recovered_vs_manual`` is POST's own
  definition (against the manual prompt, POST's ZS), beside it.
- ``gains``: POST's and direct tuning's gains over the reference with the paired bootstrap over the test
  examples (fedprompt.stats.paired_bootstrap; every seed is scored on the same examples).
- ``accuracy``: each stage's mean and interval over seeds; ``cost_ratio``: (student tuning + transfer) / direct
  tuning in estimated FLOPs, the largest over epsilons of the mean over seeds (``cost_ratio_time``: the same in
  measured compute seconds); ``epsilon`` / ``delta``: each seed's clients' and their maximum.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import post_table  # noqa: E402  (simulations/ is no package)

UNTUNED = tuple(post_table.REFERENCE_STAGE.values())  # the two untuned rows (manual prompt, no instruction)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    # allow_abbrev=False: an abbreviation of one of post_table.py's options must not be taken for one of these.
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--task", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(HERE / "results" / "headline"))
    ap.add_argument("--summary-only", action="store_true",
                    help="write the headline from the seeds' finished tables in --out, loading no model")
    args, table_args = ap.parse_known_args(argv)
    if len(set(args.seeds)) < 3:
        ap.error(f"the result protocol wants at least 3 seeds, got {args.seeds}")
    if any(a.startswith("seed=") for a in table_args):
        ap.error("give the seeds with --seeds, not --set seed=...")
    return args, table_args


def _correct(row: dict) -> np.ndarray:
    return np.array([c == "1" for c in row["correct"]], dtype=float)


def summarise(records: list[dict], seeds: list[int]) -> dict:
    """The headline JSON from each seed's finished post_table record (same settings, same test examples)."""
    from fedprompt.stats import paired_bootstrap, seed_interval

    settings = [{k: v for k, v in r["args"].items() if k not in ("out", "set")} for r in records]
    if any(s != settings[0] for s in settings):
        raise ValueError("the seeds' tables were made with different settings: "
                         f"{sorted({k for s in settings for k in s if s.get(k) != settings[0].get(k)})}")
    kinds = {r["reference"]["kind"] for r in records}
    if len(kinds) != 1:  # the choice is made on validation with the untuned model: it cannot depend on the seed
        raise ValueError(f"the seeds chose different references: {sorted(kinds)}")
    kind = kinds.pop()
    tags = list(records[0]["summary"])

    def rows(stage: str, epsilon) -> list[dict]:  # that stage's row of every seed
        return [post_table.find_row(r["rows"], stage, epsilon) for r in records]

    reference = rows(post_table.REFERENCE_STAGE[kind], None)

    def interval(values) -> dict:
        return seed_interval(values).to_dict()

    out: dict = {"task": records[0]["task"], "model": records[0]["model"], "seeds": seeds, "eval_n": records[0]["eval_n"],
                 "reference": {"kind": kind, "validation": [r["reference"]["validation"] for r in records],
                               "test": interval([r["accuracy"] for r in reference])},
                 "gap_recovered": {}, "gap_recovered_ci95": {}, "gap_recovered_per_seed": {},
                 "gap_recovered_vs_manual": {}, "gains": {}, "accuracy": {}, "epsilon": {}, "delta": {}}
    ratios: dict = {"flops": {}, "time": {}}
    for tag in tags:
        per_seed = [r["summary"][tag]["gap_recovered"] for r in records]
        gap = interval(per_seed) if None not in per_seed else {"mean": None, "ci95": None}
        out["gap_recovered"][tag], out["gap_recovered_ci95"][tag] = gap["mean"], gap["ci95"]
        out["gap_recovered_per_seed"][tag] = per_seed
        manual = [r["summary"][tag]["gap_recovered_vs_manual"] for r in records]
        out["gap_recovered_vs_manual"][tag] = interval(manual) if None not in manual else None
        out["gains"][tag] = {
            stage: paired_bootstrap([_correct(r) for r in rows(stage, tag)], [_correct(r) for r in reference]).to_dict()
            for stage in ("direct (large, central)", "POST transfer")}
        out["accuracy"][tag] = {stage: interval([r["accuracy"] for r in rows(stage, tag)])
                                for stage in post_table.STAGES if stage not in UNTUNED}
        ratios["flops"][tag] = float(np.mean([r["summary"][tag]["cost_ratio_flops"] for r in records]))
        ratios["time"][tag] = float(np.mean([r["summary"][tag]["cost_ratio_time"] for r in records]))
        students, direct = rows("student (federated)", tag), rows("direct (large, central)", tag)
        for key, direct_key in (("epsilon", "epsilon_spent"), ("delta", "delta")):  # each client's, then the max
            clients = [s.get(f"{key}_per_client") for s in students]
            out[key][tag] = None if tag == "inf" else {
                "per_client": clients, "max": max(max(c) for c in clients if c) if any(clients) else None,
                "direct": [d.get(direct_key) for d in direct]}
    for stage in UNTUNED:
        out["accuracy"][stage] = interval([r["accuracy"] for r in rows(stage, None)])
    out["cost_ratio"] = max(ratios["flops"].values())
    out["cost_ratio_time"] = max(ratios["time"].values())
    out["cost_ratio_by_epsilon"] = ratios
    out["distill"] = records[0].get("distill")
    out["settings"] = settings[0]
    out["machine"] = [r.get("machine") for r in records]
    return out


def _fmt(entry: dict | None, scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    """``mean [low, high]``; ``sign="+"`` writes gains with their sign."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    ci = entry.get("ci95")
    text = f"{entry['mean'] * scale:{sign}.{digits}f}"
    return text + (f" [{ci[0] * scale:{sign}.{digits}f}, {ci[1] * scale:{sign}.{digits}f}]" if ci else "")


def markdown(summary: dict) -> str:
    lines = [f"# POST on {summary['task']} under the result protocol (seeds {summary['seeds']}, "
             f"{summary['eval_n']} test examples)", "",
             f"Reference: **{summary['reference']['kind']}** (chosen on validation: {summary['reference']['validation'][0]}), "
             f"{_fmt(summary['reference']['test'])} on test.", "",
             "| epsilon | gap recovered [95% CI over seeds] | per seed | vs the manual prompt (POST's ZS) | "
             "POST gain (paired 95% CI) | direct gain (paired 95% CI) |", "|---|---|---|---|---|---|"]
    for tag in summary["gap_recovered"]:
        gains = summary["gains"][tag]
        entry = {"mean": summary["gap_recovered"][tag], "ci95": summary["gap_recovered_ci95"][tag]}
        lines.append(f"| {tag} | {_fmt(entry, digits=2)} | {summary['gap_recovered_per_seed'][tag]} | "
                     f"{_fmt(summary['gap_recovered_vs_manual'][tag], digits=2)} | "
                     f"{_fmt(gains['POST transfer'], 100, 1, '+')} | {_fmt(gains['direct (large, central)'], 100, 1, '+')} |")
    lines += ["", "| stage | epsilon | accuracy (mean [95% CI]) |", "|---|---|---|"]
    for key, value in summary["accuracy"].items():
        if "mean" in value:
            lines.append(f"| {key} | - | {_fmt(value)} |")
        else:
            lines += [f"| {stage} | {key} | {_fmt(entry)} |" for stage, entry in value.items()]
    lines += ["", f"Cost ratio (student tuning + transfer) / direct tuning: FLOPs {summary['cost_ratio']:.3f}, "
                  f"measured time {summary['cost_ratio_time']:.3f} (the larger over epsilons of the mean over seeds)."]
    for tag, eps in summary["epsilon"].items():
        if eps:
            lines.append(f"Epsilon {tag}: the largest client epsilon {eps['max']}, delta {summary['delta'][tag]['max']} "
                         "(every client's in the JSON).")
    lines += [f"Seed {seed}'s machine: {where}." for seed, where in zip(summary["seeds"], summary["machine"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args, table_args = parse_args(argv)
    folder = Path(args.out) / f"post_{args.task}"
    if args.summary_only:  # the tables' own settings are used (summarise checks that the seeds agree)
        if table_args:
            raise SystemExit(f"--summary-only reads the finished tables as they were made; drop {' '.join(table_args)}")
        finished = [folder / f"seed_{seed}" / f"post_{args.task}.json" for seed in args.seeds]
        missing = [str(path.parent) for path in finished if not path.is_file()]
        if missing:
            raise SystemExit(f"--summary-only: no finished table in {', '.join(missing)}; run without it to finish them")
        records = [json.loads(path.read_text()) for path in finished]
    else:
        records = [post_table.main(["--task", args.task, *table_args, "--set", f"seed={seed}",
                                    "--out", str(folder / f"seed_{seed}")]) for seed in args.seeds]
    summary = summarise(records, args.seeds)
    path = Path(args.out) / f"post_{args.task}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
