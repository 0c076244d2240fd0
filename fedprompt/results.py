"""``fedprompt report <run or sweep folder> [out=<folder>]``: what ran there, with the statistics a reviewer
asks for.

A run folder is one ``fedprompt run`` (config.yaml, summary.json, rounds.json, predictions.npz); a sweep
folder holds run folders at any depth (Hydra's ``multirun/<time>/<job>/``). Runs are grouped by every
setting that varies between them except the seed (and launch details such as folders). Per group, over
its finished runs (its seeds): ``n_seeds``; the final accuracy's mean and Student-t 95% interval (undefined
for one seed); the reference (the better untuned prompt, chosen on validation by each run); and the gain
over the reference: mean, 95% CI and p-value of a paired bootstrap over the evaluation examples
(fedprompt.stats). A group whose runs differ in task, evaluation split or evaluation examples is refused,
and so is a predictions file that does not match its run. Failed or unfinished runs are counted, never
averaged.

Written to ``<folder>/report/`` (or ``out=``): report.md, report.csv and report.json (the groups), runs.csv
(one row a run), accuracy_per_round.png and, when partition.alpha varies, accuracy_vs_alpha.png (95% CIs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedprompt.errors import ConfigError, DataError
from fedprompt.runs.protocol import PREDICTION_KEY
from fedprompt.stats import paired_bootstrap, seed_interval
from fedprompt.typed_config import flatten

# Settings that say where or how a run was launched, not what it computed; never a grouping key.
LAUNCH_KEYS = ("seed", "output_dir", "resume", "progress", "data_dir", "federation.superlink_port",
               "federation.round_timeout_s", "federation.audit_replies")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); restore it or remove the run folder from the report") from None


def run_folders(folder: Path) -> list[Path]:
    """``folder`` if it is a run, else every run folder below it (a Hydra job folder that failed included)."""
    def is_run(path: Path) -> bool:
        return (path / "config.yaml").is_file() or (path / "error.json").is_file()

    if is_run(folder):
        return [folder]
    found = {p.parent for name in ("config.yaml", "error.json") for p in folder.rglob(name)}
    return sorted((p for p in found if ".hydra" not in p.parts and is_run(p)), key=lambda p: str(p))


def query_curve(folder: Path) -> list[tuple[int, float]] | None:
    """(cumulative training queries of all clients, accuracy) after each evaluated round of a run folder's
    rounds.json; None for a run without rounds (an eval)."""
    rounds = folder / "rounds.json"
    if not rounds.is_file():
        return None
    spent, curve = 0, []
    for row in _read_json(rounds):
        spent += int(row.get("queries") or 0)
        if row.get("accuracy") is not None:
            curve.append((spent, float(row["accuracy"])))
    return curve


def read_predictions(folder: Path, summary: dict) -> dict[str, np.ndarray] | None:
    """A finished run's predictions.npz, checked against its summary (None when the run predates them)."""
    if not summary.get("predictions_file"):
        return None
    path = folder / summary["predictions_file"]
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:  # noqa: BLE001 - missing, truncated, not an npz: one line
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {err}); the run's per-example predictions "
                        "are needed for its gain: re-run it, or move the folder out of the report") from None
    from fedprompt.data.leakage import ids_digest

    def refuse(what: str) -> DataError:
        return DataError(f"{path}: {what}; it does not belong to this run (tampered or copied): re-run it, or move "
                         "the folder out of the report")

    needed = {"ids", "label", "final"} | ({PREDICTION_KEY[summary["reference_kind"]]} if summary.get("reference_kind") else set())
    if needed - set(arrays):
        raise refuse(f"lacks {sorted(needed - set(arrays))}")
    n = summary.get("eval_n")
    if any(len(a) != n for a in arrays.values()):
        raise refuse(f"holds {sorted({len(a) for a in arrays.values()})} entries per array, summary.json says eval_n={n}")
    if ids_digest(arrays["ids"]) != summary.get("eval_ids_sha256"):
        raise refuse("its example ids differ from the ones summary.json records (eval_ids_sha256)")
    for key, field in (("final", "final_accuracy"), ("manual", "manual_accuracy"), ("zero_shot", "zero_shot_accuracy")):
        if key in arrays and summary.get(field) is not None and \
                abs(float(np.mean(arrays[key] == arrays["label"])) - float(summary[field])) > 1e-9:
            raise refuse(f"its {key!r} predictions score {np.mean(arrays[key] == arrays['label']):.4f}, "
                         f"summary.json says {field}={summary[field]}")
    return arrays


def read_run(folder: Path) -> dict[str, Any]:
    """One run as a flat row: its settings (dotted keys), status, figures, per-round accuracies, predictions."""
    config_path = folder / "config.yaml" if (folder / "config.yaml").is_file() else folder / ".hydra" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False) if config_path.is_file() else {}
    summary, result = _read_json(folder / "summary.json"), _read_json(folder / "result.json")
    rows = _read_json(folder / "rounds.json") or []
    error = _read_json(folder / "error.json")
    status = "failed" if error else "completed" if summary and result else "unfinished"
    row = {f"config.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in flatten(config).items()}
    row.update(folder=str(folder), status=status, error=(error or {}).get("error"),
               rounds_done=max((r["round"] for r in rows), default=None),
               per_round=json.dumps([[r["round"], r["accuracy"]] for r in rows if r.get("accuracy") is not None]))
    summary = summary or {}
    for key in ("task", "eval_split", "eval_n", "eval_ids_sha256", "final_accuracy", "initial_accuracy",
                "manual_accuracy", "zero_shot_accuracy", "reference_kind", "reference_accuracy",
                "queries_per_client_round", "git_commit", "config_sha256", "model_dtype"):
        row[key] = summary.get(key)
    row["wall_s"] = (result or {}).get("wall_s")
    row["predictions"] = read_predictions(folder, summary) if status == "completed" else None
    return row


def completed_runs(folder: Path) -> list[dict[str, Any]]:
    """The finished runs under ``folder`` (read_run rows), by seed; [] when the folder does not exist."""
    runs = [read_run(f) for f in run_folders(folder)] if folder.is_dir() else []
    return sorted((r for r in runs if r["status"] == "completed"), key=lambda r: int(r.get("config.seed") or 0))


def _varying(runs, keys: list[str]) -> list[str]:
    return [k for k in keys if runs[k].astype(str).nunique(dropna=False) > 1]


def _check_one_evaluation(group: dict, done) -> None:
    """Runs averaged together must be scored on one task, one split, the same examples."""
    for key, what in (("task", "tasks"), ("eval_split", "evaluation splits"), ("eval_ids_sha256", "evaluation examples")):
        values = sorted({str(v) for v in done[key]})
        if len(values) > 1:
            raise DataError(f"group {group or '(all runs)'} mixes {what} ({', '.join(v[:16] for v in values)}): its runs "
                            "cannot be averaged or paired; report them from separate folders, or make the setting that "
                            "differs (e.g. data_dir, eval_limit) the same")


def summarize_group(group: dict, part) -> dict:
    """One group's entry of report.json."""
    done = part[part.status == "completed"]
    entry: dict[str, Any] = {"group": group, "runs": len(part), "completed": len(done),
                             "failed": int((part.status == "failed").sum()), "n_seeds": int(done["config.seed"].nunique()),
                             "seeds": sorted(int(s) for s in done["config.seed"].dropna().unique())}
    if done.empty:
        return {**entry, "eval_split": None, "eval_n": None, "final_accuracy": None, "reference": None, "gain": None}
    _check_one_evaluation(group, done)
    entry.update(eval_split=done["eval_split"].iloc[0], eval_n=int(done["eval_n"].iloc[0]) if done["eval_n"].notna().all() else None,
                 final_accuracy=seed_interval(done["final_accuracy"].astype(float)).to_dict())
    for key in ("manual_accuracy", "zero_shot_accuracy"):
        values = done[key].dropna()
        entry[key] = float(values.mean()) if len(values) == len(done) else None
    kinds = set(done["reference_kind"].dropna())
    if len(kinds) != 1 or done["reference_kind"].isna().any():
        entry.update(reference=None, gain=None,
                     note="no reference: some runs did not measure one" if not kinds else "runs chose different references")
        return entry
    kind = kinds.pop()
    entry["reference"] = {"kind": kind, "accuracy": float(done["reference_accuracy"].astype(float).mean())}
    predictions = list(done["predictions"])
    if any(p is None for p in predictions):
        entry.update(gain=None, note="no per-example predictions (runs that predate them): no paired gain")
        return entry
    correct = np.stack([p["final"] == p["label"] for p in predictions])
    reference = np.stack([p[PREDICTION_KEY[kind]] == p["label"] for p in predictions])
    entry["gain"] = paired_bootstrap(correct, reference).to_dict()
    return entry


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_interval(stat: dict | None, signed: bool = False) -> str:
    if not stat:
        return "-"
    number = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    ci = "CI undefined (1 seed)" if stat["ci95"] is None else f"[{stat['ci95'][0]:+.3f}, {stat['ci95'][1]:+.3f}]" \
        if signed else f"[{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"
    p = f", p={stat['p_value']:.3g}" if stat.get("p_value") is not None else ""
    return f"{number} {ci}{p}"


def table_rows(groups: list[dict], group_keys: list[str]) -> list[dict]:
    """report.md's and report.csv's rows (one per group)."""
    rows = []
    for g in groups:
        row = {k: g["group"].get(k) for k in group_keys}
        fa, gain, ref = g["final_accuracy"] or {}, g["gain"] or {}, g["reference"] or {}
        row.update(n_seeds=g["n_seeds"], runs=f"{g['completed']}/{g['runs']}", eval=f"{g['eval_split']} (n={g['eval_n']})",
                   final_accuracy=fa.get("mean"), final_ci_low=(fa.get("ci95") or [None])[0],
                   final_ci_high=(fa.get("ci95") or [None, None])[1], manual=g.get("manual_accuracy"),
                   zero_shot=g.get("zero_shot_accuracy"), reference_kind=ref.get("kind"),
                   reference_accuracy=ref.get("accuracy"), gain=gain.get("mean"),
                   gain_ci_low=(gain.get("ci95") or [None])[0], gain_ci_high=(gain.get("ci95") or [None, None])[1],
                   gain_p=gain.get("p_value"), note=g.get("note", ""))
        rows.append(row)
    return rows


def markdown(groups: list[dict], group_keys: list[str]) -> str:
    lines = []
    header = [*group_keys, "seeds", "runs (done/all)", "evaluation", "final accuracy (mean [95% CI])",
              "manual", "zero-shot", "reference (chosen on validation)", "gain over reference (mean [95% CI], p)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for g in groups:
        ref = g["reference"]
        cells = [str(g["group"].get(k)) for k in group_keys] + [
            str(g["n_seeds"]), f"{g['completed']}/{g['runs']}", f"{g['eval_split']} (n={g['eval_n']})",
            _fmt_interval(g["final_accuracy"]), _fmt(g.get("manual_accuracy")), _fmt(g.get("zero_shot_accuracy")),
            f"{ref['kind']} {ref['accuracy']:.3f}" if ref else "-",
            _fmt_interval(g["gain"], signed=True) if g["gain"] else g.get("note") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_alpha(groups: list[dict], group_keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in group_keys if k != "partition.alpha"]
    lines: dict[tuple, list[dict]] = {}
    for g in groups:
        if g["final_accuracy"] and g["group"].get("partition.alpha") is not None:
            lines.setdefault(tuple(g["group"].get(k) for k in others), []).append(g)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    alphas: set[float] = set()
    for label, part in sorted(lines.items(), key=lambda kv: str(kv[0])):
        part = sorted(part, key=lambda g: float(g["group"]["partition.alpha"]))
        x = [float(g["group"]["partition.alpha"]) for g in part]
        alphas.update(x)
        mean = np.array([g["final_accuracy"]["mean"] for g in part])
        ci = [g["final_accuracy"]["ci95"] or [m, m] for g, m in zip(part, mean)]  # no bar for one seed
        yerr = np.array([[m - c[0] for c, m in zip(ci, mean)], [c[1] - m for c, m in zip(ci, mean)]])
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label)) or "final prompt"
        ax.errorbar(x, mean, yerr=yerr, marker="o", capsize=3, label=name)
    refs = [g["reference"]["accuracy"] for g in groups if g["reference"]]
    if refs:
        ax.axhline(float(np.mean(refs)), color="grey", linestyle="--", label="reference (untuned)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(alphas), [f"{a:g}" for a in sorted(alphas)])  # the swept values, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("Dirichlet alpha (smaller = more non-IID)")
    ax.set_ylabel("final accuracy (mean, 95% CI over seeds)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rounds(runs, group_keys: list[str], groups: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    done = runs[runs.status == "completed"]
    keys = [f"config.{k}" for k in group_keys]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, part in (done.groupby(keys, dropna=False) if keys else [((), done)]):
        label = label if isinstance(label, tuple) else (label,)
        curves = pd.DataFrame([dict(json.loads(p)) for p in part["per_round"]])  # one row a run, one column a round
        stats = [seed_interval(curves[c].dropna()) for c in curves.columns if curves[c].notna().any()]
        rounds = [c for c in curves.columns if curves[c].notna().any()]
        mean = np.array([s.mean for s in stats])
        name = ", ".join(f"{k}={v}" for k, v in zip(group_keys, label)) or "all runs"
        line, = ax.plot(rounds, mean, marker="o", label=name)
        bounds = [s.ci95 for s in stats if s.ci95 is not None]
        if len(bounds) == len(stats):
            ax.fill_between(rounds, [low for low, _ in bounds], [high for _, high in bounds], color=line.get_color(),
                            alpha=0.15)
        reference = next((g["reference"] for g in groups if g["group"] == dict(zip(group_keys, label)) and g["reference"]),
                         None)
        if reference:  # the untuned prompt to beat, on the same examples
            ax.axhline(reference["accuracy"], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"reference ({reference['kind']})" + (f", {name}" if group_keys else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean, 95% CI over seeds)")
    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # the default AutoLocator is one; Locator.set_params only warns
        locator.set_params(integer=True)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_report(folder: Path, overrides: list[str]) -> dict:
    import pandas as pd

    options = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = sorted(set(options) - {"out"}) + [o for o in overrides if "=" not in o]
    if unknown:
        raise ConfigError(f"fedprompt report takes <folder> [out=<folder>], got {unknown}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give a run folder or a sweep folder (e.g. multirun/<time>)")
    folders = run_folders(folder)
    if not folders:
        raise ConfigError(f"no run under {folder}: a run folder holds config.yaml (written by `fedprompt run`)")
    runs = pd.DataFrame([read_run(f) for f in folders])
    if not (runs.status == "completed").any():
        counts = runs.status.value_counts().to_dict()
        raise ConfigError(f"no finished run under {folder} ({counts}): nothing to report; finish or resume the runs "
                          "first (fedprompt resume <run folder>)")
    out = Path(options.get("out") or folder / "report")
    out.mkdir(parents=True, exist_ok=True)

    settings = [c for c in runs.columns if c.startswith("config.")]
    group_cols = [k for k in _varying(runs, settings) if k.removeprefix("config.") not in LAUNCH_KEYS]
    group_keys = [k.removeprefix("config.") for k in group_cols]
    if "config.seed" not in runs:
        runs["config.seed"] = None
    parts = runs.groupby(group_cols, dropna=False, sort=True) if group_cols else [((), runs)]
    groups = []
    for values, part in parts:
        values = values if isinstance(values, tuple) else (values,)
        group = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in zip(group_keys, values)}
        groups.append(summarize_group(group, part))

    text = markdown(groups, group_keys)
    (out / "report.md").write_text(f"# Report of {folder}\n\n{text}\n\n{NOTE}\n")
    pd.DataFrame(table_rows(groups, group_keys)).to_csv(out / "report.csv", index=False)
    (out / "report.json").write_text(json.dumps(groups, indent=2, default=_json_default) + "\n")
    runs.drop(columns=["per_round", "predictions"]).to_csv(out / "runs.csv", index=False)
    plots = []
    if "partition.alpha" in group_keys:
        _plot_alpha(groups, group_keys, out / "accuracy_vs_alpha.png")
        plots.append(str(out / "accuracy_vs_alpha.png"))
    _plot_rounds(runs, group_keys, groups, out / "accuracy_per_round.png")
    plots.append(str(out / "accuracy_per_round.png"))
    print(text)
    return {
        "folder": str(folder), "runs": len(runs), "completed": int((runs.status == "completed").sum()),
        "failed": int((runs.status == "failed").sum()), "unfinished": int((runs.status == "unfinished").sum()),
        "grouped_by": group_keys, "groups": json.loads(json.dumps(groups, default=_json_default)),
        "files": {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "json": str(out / "report.json"),
                  "runs": str(out / "runs.csv"), "plots": plots},
    }


NOTE = ("Final accuracy: mean over seeds with a Student-t 95% interval (undefined for one seed). Reference: the better "
        "of the manual prompt and zero-shot on the validation split, scored on the same evaluation examples. Gain: "
        "paired bootstrap over the evaluation examples (10,000 replicates, seeds averaged per example), 95% percentile "
        "interval and two-sided p-value (docs/experiments.md, Statistics).")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
