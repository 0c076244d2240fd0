"""simulations/ablations/feddtpt_table.py: one row per ablation folder, its gain over the reference taken from the
folder's `fedprompt report`, its paired difference from the paper's-server row on the same seeds and examples,
and what the server did; unfinished rows are named, rows scored on different examples refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fedprompt.data.leakage import ids_digest
from fedprompt.results import cmd_report

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("feddtpt_table", REPO / "simulations" / "ablations" / "feddtpt_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)

LABEL = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
ZERO_SHOT = np.array([0, 1, 0, 1, 0, 0, 1, 0, 1, 0])  # 5 of 10 right


def write_run(folder: Path, seed: int, final: np.ndarray, ids: np.ndarray, floored: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\ntask: trec\n")
    np.savez(folder / "predictions.npz", ids=ids, label=LABEL, manual=ZERO_SHOT, zero_shot=ZERO_SHOT, final=final)
    accuracy = float((final == LABEL).mean())
    (folder / "summary.json").write_text(json.dumps({
        "task": "trec", "eval_split": "test", "eval_n": 10, "eval_ids_sha256": ids_digest(ids),
        "final_accuracy": accuracy, "manual_accuracy": 0.5, "zero_shot_accuracy": 0.5, "reference_kind": "zero-shot",
        "reference_accuracy": 0.5, "queries_per_client_round": 280.0, "predictions_file": "predictions.npz"}))
    (folder / "result.json").write_text(json.dumps({"wall_s": 1.0}))
    aggregation = {"knee_found": True, "eps_floored": floored}
    (folder / "rounds.json").write_text(json.dumps([
        {"round": 0, "accuracy": 0.5, "queries": 0, "prompt_length": 16},
        {"round": 1, "accuracy": accuracy, "queries": 2800, "prompt_length": 3, "aggregation": aggregation}]))


def test_rows_report_their_gain_and_the_paired_difference_from_the_papers_server(tmp_path):
    ids = np.arange(10, dtype=np.uint64)
    for seed in (0, 1):
        write_run(tmp_path / "feddtpt_trec_frozen" / str(seed), seed, ZERO_SHOT, ids, floored=True)  # = the reference
        write_run(tmp_path / "feddtpt_trec_agreement" / str(seed), seed, LABEL.copy(), ids, floored=False)  # all right
    for row in ("frozen", "agreement"):
        cmd_report(tmp_path / f"feddtpt_trec_{row}", [])

    out = table.main(["--task", "trec", "--results", str(tmp_path)])

    rows = {e["row"]: e for e in out["rows"]}
    assert rows["frozen"]["gain"]["mean"] == pytest.approx(0.0) and "vs_baseline" not in rows["frozen"]
    assert rows["agreement"]["gain"]["mean"] == pytest.approx(0.5)
    assert rows["agreement"]["vs_baseline"]["mean"] == pytest.approx(0.5)
    assert rows["frozen"]["eps_from"] == {"knee": 0, "guard": 2, "fixed or none": 0}
    assert rows["agreement"]["eps_from"]["knee"] == 2 and rows["agreement"]["final_prompt_words"] == [3, 3]
    assert "no_filter" in out["missing"] and "fedavg" in out["missing"]
    text = (tmp_path / "feddtpt_trec_table.md").read_text()
    assert "| ours: the filter scores agreement" in text and "+50.0" in text and "Not finished: no_filter" in text


def test_rows_scored_on_different_examples_are_refused(tmp_path):
    write_run(tmp_path / "feddtpt_trec_frozen" / "0", 0, ZERO_SHOT, np.arange(10, dtype=np.uint64), floored=True)
    write_run(tmp_path / "feddtpt_trec_kmeans" / "0", 0, ZERO_SHOT, np.arange(10, 20, dtype=np.uint64), floored=True)
    with pytest.raises(SystemExit, match="different test examples"):
        table.main(["--task", "trec", "--results", str(tmp_path)])


def test_explicit_rows_pair_with_the_named_baseline(tmp_path):
    ids = np.arange(10, dtype=np.uint64)
    write_run(tmp_path / "split_iid" / "0", 0, LABEL.copy(), ids, floored=False)
    write_run(tmp_path / "split_0.1" / "0", 0, ZERO_SHOT, ids, floored=False)
    for folder in ("split_iid", "split_0.1"):
        cmd_report(tmp_path / folder, [])
    out = table.main(["--task", "trec", "--results", str(tmp_path), "--baseline", "iid", "--out", "partitions",
                      "--row", "iid=split_iid", "--row", "Dirichlet 0.1=split_0.1"])
    rows = {e["row"]: e for e in out["rows"]}
    assert rows["Dirichlet 0.1"]["vs_baseline"]["mean"] == pytest.approx(-0.5) and "vs_baseline" not in rows["iid"]
    assert "| vs iid |" in (tmp_path / "partitions.md").read_text() and out["missing"] == []
