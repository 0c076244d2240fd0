"""simulations/run.py: one command runs a config's experiments (runs with their own command, results quoted
from earlier runs) and writes the table and the accuracy-against-queries plot; a run that cannot start fails
alone and the table still comes out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fl_support import write_secret_task
from tests.test_bdpl import bdpl_overrides

REPO = Path(__file__).resolve().parents[1]


def test_a_comparison_config_gives_its_table_and_plot(tmp_path, tiny_model_dir):
    data = write_secret_task(tmp_path / "data")
    common = [o for o in bdpl_overrides(data, tiny_model_dir) if not o.startswith("method")]
    config = {
        "command": "run",
        "common": common,
        "runs": {
            "manual": {"command": "eval", "overrides": ["split=test"]},
            "bdpl": [o for o in bdpl_overrides(data, tiny_model_dir) if o.startswith("method")],
            # quotes the BDPL run's final prompt into an eval: the @{...} substitution
            "bdpl-prompt-again": {"command": "eval", "overrides": ["split=test", "prompt=@{compare/bdpl:final_prompt}"]},
            "needs-a-missing-run": {"command": "eval", "overrides": ["prompt=@{compare/nothing:final_prompt}"]},
        },
        "columns": ["final_accuracy", "queries"],
        "plot": "queries",
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "simulations" / "run.py"), str(path), "--results", str(results)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one run could not start: the exit status says so
    assert "needs-a-missing-run" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == ["needs-a-missing-run"] and summary["runs"] == 3

    first_table = json.loads((results / "compare" / "table.json").read_text())
    rows = {row["run"]: row for row in first_table}
    assert set(rows) == {"manual", "bdpl", "bdpl-prompt-again"}
    assert all(0.0 <= row["final_accuracy"] <= 1.0 for row in rows.values())  # an eval's accuracy fills the column
    assert rows["bdpl"]["queries"] > 0
    bdpl = json.loads((results / "compare" / "bdpl" / "result.json").read_text())
    again = json.loads((results / "compare" / "bdpl-prompt-again" / "result.json").read_text())
    assert again["prompt"] == bdpl["final_prompt"]
    assert (results / "compare" / "plot.png").stat().st_size > 1000
    assert "| bdpl |" in (results / "compare" / "table.md").read_text()

    # --only runs (or here: finds done) one run, and the table keeps the rows of the others that finished.
    proc = subprocess.run([sys.executable, str(REPO / "simulations" / "run.py"), str(path), "--results", str(results),
                           "--only", "manual"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows_again = json.loads((results / "compare" / "table.json").read_text())
    assert rows_again == first_table


def test_the_target_column_counts_queries_until_a_round_beats_the_reference_and_gives_the_ratio(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("simulations_run", REPO / "simulations" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    curves = {"fast": [(100, 0.70), (100, 0.74), (100, 0.80)], "slow": [(300, 0.71), (300, 0.731), (300, 0.76)],
              "never": [(50, 0.70), (50, 0.72)]}
    finished = [("manual", tmp_path / "manual", {"final_accuracy": 0.70})]
    for name, curve in curves.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rounds.json").write_text(json.dumps([{"queries": q, "accuracy": a} for q, a in curve]))
        finished.append((name, tmp_path / name, {"final_accuracy": curve[-1][1]}))
    rows = [{"run": name} for name, _, _ in finished]
    lines = run.target_lines({"reference": "manual", "points": 3, "ratio": ["fast", "slow"]}, finished, rows)
    needed = {row["run"]: row["queries_to_target"] for row in rows}
    assert needed == {"manual": None, "fast": 200, "slow": 600, "never": None}  # 0.74 >= 0.73; 0.731 >= 0.73
    assert "never not reached" in lines[0] and lines[-1] == "Ratio fast / slow: 0.333."
    lines = run.target_lines({"reference": "manual", "points": 3, "ratio": ["fast", "never"]}, finished, rows)
    assert "undefined" in lines[-1]
    (tmp_path / "never" / "rounds.json").write_text(json.dumps([{"queries": 0, "accuracy": 0.9}]))  # reached untrained
    lines = run.target_lines({"reference": "manual", "points": 3, "ratio": ["fast", "never"]}, finished, rows)
    assert "untrained start already reaches" in lines[-1]
    run.target_lines({"reference": "manual", "points": 3, "runs": ["fast"]}, finished, rows)  # the others left out
    assert {row["run"]: row["queries_to_target"] for row in rows} == {"manual": None, "fast": 200, "slow": None, "never": None}
