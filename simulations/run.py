"""Run the experiments of one simulations/ config and write their table.

    python simulations/run.py simulations/feddtpt_sst2.yaml [--only NAME ...] [--force] [--dry-run]

A config names a fedprompt command, overrides shared by every run, and the runs (each a list of extra
overrides, the same ``key=value`` syntax as the command line):

    command: run
    common: [task=sst2, federation.num_clients=10]
    runs:
      dirichlet-1.0: [partition=dirichlet, partition.alpha=1.0]
      iid: [partition=iid]
    columns: [final_accuracy, manual_accuracy, queries_per_client_round]   # optional
    plot: queries     # optional: accuracy against cumulative black-box queries, one line per run (plot.png)

``target: {reference: manual, points: 3, ratio: [feddtpt, fedone], runs: [...]}`` (optional) adds the
column ``queries_to_target``: the cumulative training queries after which a run's global prompt first
scored ``points`` above the reference run's accuracy (for ``runs`` only, default all), and below the table
the ratio of the two runs named.

A run may also name its own command: ``manual: {command: eval, overrides: [split=test]}`` (an eval's
``accuracy`` fills the ``final_accuracy`` column; in the plot it is a horizontal line).

An override may quote another run's result as ``@{<config name>/<run name>:<key>}`` (e.g. evaluate the
final prompt of a FedDTPT run on another model: ``prompt=@{feddtpt_sst2/dirichlet-1.0:final_prompt}``);
that run must have finished.

Each run's folder is ``<results>/<config name>/<run name>`` (``--results``, default
``simulations/results``); a run whose result.json exists is not run again unless ``--force``, so an
interrupted table resumes where it stopped. The table (markdown and JSON, one row per run: the chosen
columns of the command's result, plus its overrides) is written beside the run folders.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedprompt.results import query_curve

DEFAULT_COLUMNS = ["final_accuracy", "manual_accuracy", "initial_accuracy", "rounds", "queries_per_client_round",
                   "bytes_up_per_client_round", "wall_s", "final_prompt"]


def load(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("runs"), dict) or not config["runs"]:
        sys.exit(f"{path}: expected a mapping with a non-empty 'runs' mapping (name: [overrides])")
    for name, extra in config["runs"].items():
        if isinstance(extra, dict):
            if set(extra) - {"command", "overrides"} or not isinstance(extra.get("overrides", []), list):
                sys.exit(f"{path}: run {name!r} must be a list of overrides or {{command: ..., overrides: [...]}}")
        elif not isinstance(extra, list):
            sys.exit(f"{path}: run {name!r} must be a list of key=value overrides")
    return config


def run_spec(default_command: str, extra) -> tuple[str, list[str]]:
    """A run's command and its own overrides (a list, or a mapping with its own command)."""
    if isinstance(extra, dict):
        return str(extra.get("command", default_command)), [str(o) for o in extra.get("overrides") or []]
    return default_command, [str(o) for o in extra]


def plot_queries(runs: list[tuple[str, Path, dict]], path: Path) -> None:
    """Accuracy of the global prompt against the cumulative training queries of each run (rounds.json);
    a run without rounds (an eval) is a dashed horizontal line at its accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    flat = []
    for name, folder, result in runs:
        curve = query_curve(folder)
        if curve is not None:
            ax.plot([q for q, _ in curve], [a for _, a in curve], marker="o", label=name)
        elif result.get("accuracy") is not None:
            flat.append((name, result["accuracy"]))
    styles = ("--", ":", "-.", (0, (5, 1, 1, 1)))  # one style per flat line: they share two colours
    for i, (name, accuracy) in enumerate(flat):
        ax.axhline(accuracy, linestyle=styles[i % len(styles)], linewidth=1, label=name,
                   color="grey" if "zero" in name else "black")
    ax.set_xlabel("cumulative black-box queries (training, all clients)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def queries_to_reach(folder: Path, accuracy: float) -> int | None:
    """Cumulative training queries (all clients) after the first round whose global prompt scores at least
    ``accuracy``; None if no round does (or the run has no rounds)."""
    return next((spent for spent, score in query_curve(folder) or [] if score >= accuracy - 1e-12), None)


def target_lines(target: dict, finished: list[tuple[str, Path, dict]], rows: list[dict]) -> list[str]:
    """Fill each row's ``queries_to_target`` (the queries a run needed to beat ``target.reference``'s
    accuracy by ``target.points``) and say it, with the ratio of the two runs ``target.ratio`` names."""
    results = {name: result for name, _, result in finished}
    reference = results.get(str(target["reference"]), {}).get("final_accuracy")
    if reference is None:
        return [f"Target: the reference run {target['reference']!r} has no result yet."]
    goal = reference + float(target["points"]) / 100
    runs = set(target.get("runs") or [name for name, _, _ in finished])  # e.g. leave out runs scored on another model
    needed = {name: queries_to_reach(folder, goal) for name, folder, _ in finished
              if name in runs and (folder / "rounds.json").is_file()}
    for row in rows:
        row["queries_to_target"] = needed.get(row["run"])
    lines = [f"Target: {target['reference']} + {target['points']} points = accuracy {goal:.4f}. Training queries "
             "(all clients) until a round's global prompt reaches it: "
             + ", ".join(f"{name} {q if q is not None else 'not reached'}" for name, q in needed.items())
             + " (0: the untrained starting prompt already reaches it)."]
    if target.get("ratio"):
        a, b = (str(x) for x in target["ratio"])
        qa, qb = needed.get(a), needed.get(b)
        if qa is None or qb is None:
            ratio = "undefined (a run did not reach the target)"
        elif qb == 0:
            ratio = f"undefined ({b}'s untrained start already reaches the target)"
        else:
            ratio = f"{qa / qb:.3f}"
        lines.append(f"Ratio {a} / {b}: {ratio}.")
    return lines


def fill(override: str, results: Path) -> str:
    """Replace ``@{config/run:key}`` by that run's result value."""

    def value(match: re.Match) -> str:
        path = results / match.group(1) / "result.json"
        if not path.is_file():
            raise RuntimeError(f"{override!r} needs {path}: run that experiment first")
        text = str(json.loads(path.read_text())[match.group(2)])
        # A Hydra quoted string, so that commas, colons and brackets in a prompt stay text.
        return "'" + text.replace("'", "\\'") + "'"

    return re.sub(r"@\{([^:}]+):([^}]+)\}", value, override)


def run_one(command: str, overrides: list[str], folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "fedprompt.cli", command, *overrides, f"output_dir={folder}"]
    print("$ fedprompt", command, " ".join(overrides), flush=True)
    start = time.perf_counter()
    with (folder / "stdout.log").open("w") as log:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run failed (exit {proc.returncode}); see {folder / 'stdout.log'}")
    result = json.loads(lines[-1])
    result.setdefault("wall_s", round(time.perf_counter() - start, 1))
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value).replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--only", nargs="*", help="run only these run names")
    parser.add_argument("--force", action="store_true", help="re-run runs that already have a result")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    config = load(args.config)
    command, common = str(config.get("command", "run")), [str(o) for o in config.get("common") or []]
    columns = list(config.get("columns") or DEFAULT_COLUMNS)
    out = args.results / args.config.stem
    rows, failed, finished = [], [], []
    for name, spec in config["runs"].items():
        run_command, extra = run_spec(command, spec)
        folder, done = out / name, out / name / "result.json"
        if args.only and name not in args.only:
            if args.dry_run or not done.is_file():
                continue
            # Not run now, but finished earlier: its row stays in the table (--only must not drop it).
            result = json.loads(done.read_text())
        else:
            try:
                overrides = [fill(o, args.results) for o in common + extra]  # a missing @{...} result fails this run only
                if args.dry_run:
                    print("fedprompt", run_command, " ".join(overrides), f"output_dir={folder}")
                    continue
                result = json.loads(done.read_text()) if done.is_file() and not args.force else run_one(run_command, overrides, folder)
            except RuntimeError as err:
                print(f"{name}: {err}", file=sys.stderr)
                failed.append(name)
                continue
        if "final_accuracy" not in result and "accuracy" in result:  # an eval: its accuracy is the final one
            result = {**result, "final_accuracy": result["accuracy"]}
        finished.append((name, folder, result))
        rows.append({"run": name, **{c: result.get(c) for c in columns}, "overrides": " ".join(extra)})
    if args.dry_run:
        return
    out.mkdir(parents=True, exist_ok=True)
    notes = target_lines(config["target"], finished, rows) if config.get("target") else []
    if notes:
        columns.append("queries_to_target")
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ["run", *columns, "overrides"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in header) + " |" for row in rows]
    lines += ([""] + notes) if notes else []
    (out / "table.md").write_text(f"# {args.config.stem}\n\n`fedprompt {command} {' '.join(common)}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    if config.get("plot") == "queries" and finished:
        plot_queries(finished, out / "plot.png")
    print(json.dumps({"config": str(args.config), "table": str(out / "table.md"), "runs": len(rows), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
