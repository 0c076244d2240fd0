"""``fedprompt report <run or sweep folder> [out=<folder>]``: one table and two plots of what ran there.

A run folder is one ``fedprompt run`` (config.yaml, summary.json, rounds.json); a sweep folder holds run
folders at any depth (Hydra's ``multirun/<time>/<job>/``). Runs are grouped by every setting that varies
between them except the seed (and launch details such as folders), and each group gets the mean +- std
over its runs (its seeds) of the final accuracy, the round-0 (seed prompt) accuracy and the manual
prompt's accuracy on the same examples. Failed or unfinished runs are counted, never averaged.

Written to ``<folder>/report/`` (or ``out=``): report.md and report.csv (the table), runs.csv (one row a
run), accuracy_vs_alpha.png (when partition.alpha varies) and accuracy_per_round.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedprompt.errors import ConfigError

# Settings that say where or how a run was launched, not what it computed; never a grouping key.
LAUNCH_KEYS = ("seed", "output_dir", "resume", "progress", "data_dir", "federation.superlink_port",
               "federation.round_timeout_s", "federation.audit_replies")
METRICS = {"final_accuracy": "final accuracy", "initial_accuracy": "round-0 accuracy",
           "manual_accuracy": "manual prompt"}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list) else data}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_folders(folder: Path) -> list[Path]:
    """``folder`` if it is a run, else every run folder below it (a Hydra job folder that failed included)."""
    def is_run(path: Path) -> bool:
        return (path / "config.yaml").is_file() or (path / "error.json").is_file()

    if is_run(folder):
        return [folder]
    found = {p.parent for name in ("config.yaml", "error.json") for p in folder.rglob(name)}
    return sorted((p for p in found if ".hydra" not in p.parts and is_run(p)), key=lambda p: str(p))


def read_run(folder: Path) -> dict[str, Any]:
    """One run as a flat row: its settings (dotted keys), status, figures and per-round accuracies."""
    config_path = folder / "config.yaml" if (folder / "config.yaml").is_file() else folder / ".hydra" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False) if config_path.is_file() else {}
    summary, result = _read_json(folder / "summary.json"), _read_json(folder / "result.json")
    rows = _read_json(folder / "rounds.json") or []
    error = _read_json(folder / "error.json")
    status = "failed" if error else "completed" if summary and result else "unfinished"
    row = {f"config.{k}": v for k, v in _flat(config).items()}
    row.update(folder=str(folder), status=status, error=(error or {}).get("error"),
               rounds_done=max((r["round"] for r in rows), default=None),
               per_round=json.dumps([[r["round"], r["accuracy"]] for r in rows]))
    for key in METRICS:
        row[key] = (summary or {}).get(key)
    row["queries_per_client_round"] = (summary or {}).get("queries_per_client_round")
    row["wall_s"] = (result or {}).get("wall_s")
    return row


def _varying(runs, keys: list[str]) -> list[str]:
    return [k for k in keys if runs[k].astype(str).nunique(dropna=False) > 1]


def _mean_std(series) -> str:
    values = series.dropna()
    if values.empty:
        return "-"
    return f"{values.mean():.3f}" if len(values) == 1 else f"{values.mean():.3f} ± {values.std():.3f}"


def build_table(runs, group_keys: list[str]):
    """Per group: runs, completed, failed, seeds, and mean / std of each metric over the completed runs."""
    import pandas as pd

    records = []
    groups = runs.groupby(group_keys, dropna=False, sort=True) if group_keys else [((), runs)]
    for values, part in groups:
        values = values if isinstance(values, tuple) else (values,)
        done = part[part.status == "completed"]
        record: dict[str, Any] = {k.removeprefix("config."): v for k, v in zip(group_keys, values)}
        record.update(runs=len(part), completed=len(done), failed=int((part.status == "failed").sum()),
                      seeds=" ".join(str(s) for s in sorted(done["config.seed"].dropna().unique())))
        for key in METRICS:
            numbers = pd.to_numeric(done[key], errors="coerce")
            record[f"{key}_mean"], record[f"{key}_std"] = numbers.mean(), numbers.std()
            record[f"{key}_text"] = _mean_std(numbers)
        record["queries_per_client_round"] = pd.to_numeric(done["queries_per_client_round"], errors="coerce").mean()
        records.append(record)
    return pd.DataFrame(records)


def markdown(table, group_keys: list[str]) -> str:
    columns = {k.removeprefix("config."): k.removeprefix("config.") for k in group_keys}
    columns.update({f"{k}_text": f"{label} (mean ± std)" for k, label in METRICS.items()})
    columns.update(done="runs (completed/all)", failed="failed", seeds="seeds")
    view = table.assign(done=table.completed.astype(str) + "/" + table.runs.astype(str))[list(columns)]
    view = view.rename(columns=columns)
    return view.to_markdown(index=False, disable_numparse=True)  # keep "0.500 ± 0.012" as written


def _plot_alpha(table, group_keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k.removeprefix("config.") for k in group_keys if k != "config.partition.alpha"]
    data = table.dropna(subset=["partition.alpha", "final_accuracy_mean"]).sort_values("partition.alpha")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, part in (data.groupby(others, dropna=False) if others else [("", data)]):
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
        ax.errorbar(part["partition.alpha"].astype(float), part["final_accuracy_mean"],
                    yerr=part["final_accuracy_std"].fillna(0), marker="o", capsize=3, label=name or "final prompt")
    if data["manual_accuracy_mean"].notna().any():
        ax.axhline(data["manual_accuracy_mean"].mean(), color="grey", linestyle="--", label="manual prompt")
    ax.set_xscale("log")
    alphas = sorted(data["partition.alpha"].astype(float).unique())
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])  # the swept values, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("Dirichlet alpha (smaller = more non-IID)")
    ax.set_ylabel("final accuracy (mean ± std over seeds)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rounds(runs, group_keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    done = runs[runs.status == "completed"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, part in (done.groupby(group_keys, dropna=False) if group_keys else [((), done)]):
        label = label if isinstance(label, tuple) else (label,)
        curves = pd.DataFrame([dict(json.loads(p)) for p in part["per_round"]])  # one row a run, one column a round
        mean, std = curves.mean(), curves.std().fillna(0)
        name = ", ".join(f"{k.removeprefix('config.')}={v}" for k, v in zip(group_keys, label)) or "all runs"
        line, = ax.plot(mean.index, mean.values, marker="o", label=name)
        ax.fill_between(mean.index, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.xaxis.get_major_locator().set_params(integer=True)
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
    out = Path(options.get("out") or folder / "report")
    out.mkdir(parents=True, exist_ok=True)

    runs = pd.DataFrame([read_run(f) for f in folders])
    settings = [c for c in runs.columns if c.startswith("config.")]
    group_keys = [k for k in _varying(runs, settings) if k.removeprefix("config.") not in LAUNCH_KEYS]
    if "config.seed" not in runs:
        runs["config.seed"] = None
    table = build_table(runs, group_keys)
    text = markdown(table, group_keys)
    (out / "report.md").write_text(f"# Report of {folder}\n\n{text}\n")
    table.drop(columns=[c for c in table.columns if c.endswith("_text")]).to_csv(out / "report.csv", index=False)
    runs.drop(columns=["per_round"]).to_csv(out / "runs.csv", index=False)
    plots = []
    if "config.partition.alpha" in group_keys:
        _plot_alpha(table, group_keys, out / "accuracy_vs_alpha.png")
        plots.append(str(out / "accuracy_vs_alpha.png"))
    if (runs.status == "completed").any():
        _plot_rounds(runs, group_keys, out / "accuracy_per_round.png")
        plots.append(str(out / "accuracy_per_round.png"))
    print(text)
    columns = [k.removeprefix("config.") for k in group_keys] + ["runs", "completed", "failed", "seeds"]
    columns += [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
    return {
        "folder": str(folder), "runs": len(runs), "completed": int((runs.status == "completed").sum()),
        "failed": int((runs.status == "failed").sum()), "unfinished": int((runs.status == "unfinished").sum()),
        "grouped_by": [k.removeprefix("config.") for k in group_keys],
        "table": json.loads(table[columns].to_json(orient="records")),
        "files": {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "runs": str(out / "runs.csv"),
                  "plots": plots},
    }
