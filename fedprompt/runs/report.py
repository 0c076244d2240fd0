"""The run folder's results: per-round JSON and CSV, a summary, and a plot of accuracy per round.

Files are rewritten after every round, so an interrupted run still leaves what it measured.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from fedprompt.config import make_dir

PREDICTIONS = "predictions.npz"


def run_folder(cfg) -> Path:
    """The run's folder, made: ``output_dir`` (``fedprompt run`` sets it), else outputs/run/<time>-<task>-<method>
    (``flwr run .`` by hand)."""
    if cfg.get("output_dir"):
        path = Path(str(cfg.output_dir))
    else:
        path = Path("outputs") / "run" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.task.name}-{cfg.method.name}"
    return make_dir(path).resolve()

# Flat per-round columns (CSV and JSON); the JSON rows add client prompts, failures and aggregation details.
# failures = error replies + sampled clients that never replied; queries = the clients' black-box queries.
# A round with fewer valid replies than federation.min_replies keeps the global prompt: its JSON row says why
# under "skipped" (null for aggregated rounds).
# Each column's JSON types: a resumed run's rows are checked against them (fedprompt.fl.checkpoint).
_INT, _NUM, _OPT = (int,), (int, float), (int, float, type(None))
ROW_TYPES: dict[str, tuple[type, ...]] = {
    "round": _INT, "accuracy": _OPT, "eval_n": _INT, "clients_sampled": _INT, "replies": _INT, "failures": _INT,
    "queries": _INT, "eval_queries": _INT, "bytes_down": _INT, "bytes_up": _INT, "service_bytes_sent": _INT,
    "service_bytes_received": _INT, "local_accuracy": _OPT, "train_s": _NUM, "eval_s": _NUM, "wall_s": _NUM,
    "elapsed_s": _NUM, "prompt_length": _INT, "prompt": (str,),
}
COLUMNS = tuple(ROW_TYPES)
# The JSON rows' details, in the rows of trained rounds only.
ROW_EXTRA_TYPES: dict[str, tuple[type, ...]] = {"client_metrics": (dict,), "client_prompts": (list,),
                                                "failure_details": (list,), "skipped": (str, type(None)),
                                                "aggregation": (dict,)}


@dataclass
class RoundStats:
    """What the strategy saw in one round (plain values for the per-round report)."""

    sampled: int = 0
    replies: int = 0  # valid replies (aggregated)
    missing: int = 0  # sampled clients whose reply never came (timeout, lost node)
    failures: list[dict] = field(default_factory=list)  # node id and error code/reason of each failed or missing reply
    nodes: list[int] = field(default_factory=list)  # the sampled node ids
    skipped: str | None = None  # why the round kept the old global prompt (fewer valid replies than min_replies)
    bytes_down: int = 0  # serialized content of the messages sent to clients
    bytes_up: int = 0  # serialized content of the valid replies
    metrics: dict[str, float] = field(default_factory=dict)  # summed / averaged client metrics
    client_prompts: list[str] = field(default_factory=list)
    aggregation: dict[str, Any] = field(default_factory=dict)
    train_s: float = 0.0  # first message sent -> aggregation done
    started: float = 0.0


class RunReport:
    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        self.folder, self.info = Path(folder), dict(info)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.predictions: dict[str, np.ndarray] = {}
        self.start = self.last = time.perf_counter()

    def restore(self, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
        """Continue a resumed run's report: its rows so far, its facts (elapsed time goes on from there) and the
        predictions already written (the references')."""
        self.rows, self.info = list(rows), dict(info)
        self.start -= float(rows[-1]["elapsed_s"]) if rows else 0.0
        path = self.folder / PREDICTIONS
        if path.is_file():
            with np.load(path) as data:
                self.predictions = {key: data[key] for key in data.files if key != "final"}

    def save_predictions(self, **arrays: np.ndarray) -> None:
        """Add per-example arrays (``ids``, ``label``, ``manual``, ``zero_shot``, ``final``) to predictions.npz:
        one entry per evaluation example, in the order scored, labels as class indices; no example text."""
        self.predictions.update({k: np.asarray(v) for k, v in arrays.items()})
        tmp = self.folder / (PREDICTIONS + ".tmp.npz")
        np.savez_compressed(tmp, allow_pickle=True, **self.predictions)  # named: no array is taken for the flag
        tmp.replace(self.folder / PREDICTIONS)  # a stop while writing leaves the previous file whole

    def add(self, server_round: int, prompt: list[str], accuracy: float, eval_n: int, eval_queries: int,
            eval_s: float, stats=None) -> dict[str, Any]:
        """One row; ``stats`` is the strategy's RoundStats (None for round 0, the seed prompt)."""
        now = time.perf_counter()
        metrics = stats.metrics if stats else {}
        row = {
            "round": server_round, "accuracy": accuracy, "eval_n": eval_n,
            "clients_sampled": stats.sampled if stats else 0, "replies": stats.replies if stats else 0,
            "failures": len(stats.failures) if stats else 0, "queries": int(metrics.get("queries", 0)),
            "eval_queries": eval_queries, "bytes_down": stats.bytes_down if stats else 0,
            "bytes_up": stats.bytes_up if stats else 0,
            "service_bytes_sent": int(metrics.get("bb-bytes-sent", 0)),
            "service_bytes_received": int(metrics.get("bb-bytes-received", 0)),
            "local_accuracy": metrics.get("local-accuracy"), "train_s": round(stats.train_s, 3) if stats else 0.0,
            "eval_s": round(eval_s, 3), "wall_s": round(now - self.last, 3), "elapsed_s": round(now - self.start, 3),
            "prompt_length": len(prompt), "prompt": " ".join(prompt),
        }
        if stats:
            row.update(client_metrics=stats.metrics, client_prompts=stats.client_prompts,
                       failure_details=stats.failures, skipped=stats.skipped, aggregation=stats.aggregation)
        self.rows.append(row)
        self.last = now
        self._write_rounds()
        return row

    def _write_rounds(self) -> None:
        (self.folder / "rounds.json").write_text(json.dumps(self.rows, indent=2) + "\n")
        with (self.folder / "rounds.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display (also inside Ray and on headless machines)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        scored = [r for r in self.rows if r["accuracy"] is not None]  # federation.eval_every skips rounds
        ax.plot([r["round"] for r in scored], [r["accuracy"] for r in scored], marker="o", label="global prompt")
        for key, label, style in (("manual_accuracy", "manual prompt", "--"), ("zero_shot_accuracy", "zero-shot", ":")):
            if self.info.get(key) is not None:
                ax.axhline(self.info[key], color="grey", linestyle=style, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(f"accuracy ({self.info.get('eval_split', 'test')}, n={self.info.get('eval_n', '?')})")
        ax.set_title(f"{self.info.get('method', '')} on {self.info.get('task', '')}, {self.info.get('num_clients', '?')} clients")
        cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)  # a new axis's AutoLocator
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(self.folder / "accuracy.png", dpi=120)
        plt.close(fig)

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write summary.json: the final figures and totals (costs per client per round included)."""
        trained = [r for r in self.rows if r["round"] > 0]
        client_rounds = sum(r["replies"] for r in trained) or 1
        summary = {
            **self.info,
            "rounds": len(trained),
            "final_accuracy": self.rows[-1]["accuracy"] if self.rows else None,
            "initial_accuracy": self.rows[0]["accuracy"] if self.rows else None,
            "final_prompt": self.rows[-1]["prompt"] if self.rows else None,
            "queries": sum(r["queries"] for r in trained),
            "queries_per_client_round": sum(r["queries"] for r in trained) / client_rounds,
            "eval_queries": sum(r["eval_queries"] for r in self.rows),
            "bytes_down": sum(r["bytes_down"] for r in trained),
            "bytes_up": sum(r["bytes_up"] for r in trained),
            "bytes_up_per_client_round": sum(r["bytes_up"] for r in trained) / client_rounds,
            "service_bytes": sum(r["service_bytes_sent"] + r["service_bytes_received"] for r in trained),
            "failures": sum(r["failures"] for r in trained),
            "skipped_rounds": [r["round"] for r in trained if r.get("skipped")],
            "client_replies": sum(r["replies"] for r in trained),
            "server_wall_s": round(time.perf_counter() - self.start, 3),
            "predictions_file": PREDICTIONS if "final" in self.predictions else None,
            **extra,
        }
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


METHOD_NAMES = {"feddtpt": "FedDTPT", "post": "POST", "rapt": "RAPT", "bbt": "BBT", "bdpl": "BDPL",
                "fedprompt": "FedPrompt"}


def results_table(summary: dict[str, Any]) -> str:
    """The console's closing table: the untuned prompts and the final prompt on the same evaluation examples,
    the reference (chosen on validation) marked, and where the plot is."""
    name = METHOD_NAMES.get(str(summary.get("method")), str(summary.get("method")))
    kind = summary.get("reference_kind")
    rows = [("manual prompt", summary.get("manual_accuracy"), kind == "manual"),
            ("zero-shot (no instruction)", summary.get("zero_shot_accuracy"), kind == "zero-shot"),
            (f"{name} final prompt", summary.get("final_accuracy"), False)]
    lines = [f"{summary.get('task')}, {summary.get('eval_split')} split, n={summary.get('eval_n')}:"]
    for label, accuracy, is_reference in rows:
        if accuracy is None:
            continue
        mark = "   <- reference (the better one on validation)" if is_reference else ""
        lines.append(f"  {label:<28} {accuracy:.3f}{mark}")
    if kind and summary.get("final_accuracy") is not None and summary.get("reference_accuracy") is not None:
        gain = 100 * (summary["final_accuracy"] - summary["reference_accuracy"])
        lines.append(f"  gain over the reference: {gain:+.1f} points (one seed; fedprompt report gives CIs over seeds)")
    if summary.get("output_dir"):
        lines.append(f"  plot: {Path(summary['output_dir']) / 'accuracy.png'}")
    return "\n".join(lines)
