"""simulations/rapt_curves.py on a tiny model: the curves' files, and --resume keeping finished etas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fl_support import write_secret_task

REPO = Path(__file__).resolve().parents[1]


def curves(out: Path, data: Path, model: Path, *etas: str, resume: bool = False) -> list[dict]:
    args = [sys.executable, str(REPO / "simulations" / "rapt_curves.py"), "--tasks", "secret", "--etas", *etas,
            "--train-size", "8", "--eval-size", "6", "--steps", "1", "--threads", "1", "--out", str(out),
            *(["--resume"] if resume else []), f"data_dir={data}", f"model={model}", "method.train.batch_size=4"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "rapt_curves.json").read_text())["rows"]


def test_curves_write_their_files_and_resume_keeps_finished_etas(tmp_path, tiny_model_dir):
    data = write_secret_task(tmp_path / "data")
    out = tmp_path / "curves"
    first = curves(out, data, tiny_model_dir, "30")
    assert {(r["eta"], r["variant"]) for r in first} == {
        (float("inf"), "untrained"), (30.0, "untrained"), (30.0, "none"), (30.0, "reconstruction")}
    assert (out / "rapt_curves.png").stat().st_size > 1000 and "| 30 |" in (out / "rapt_curves.md").read_text()

    # An interrupted sweep: eta 20 has its first rows only. Resuming drops them and runs 20 again, keeps 30.
    payload = json.loads((out / "rapt_curves.json").read_text())
    payload["rows"].append({**first[1], "eta": 20.0, "variant": "untrained", "accuracy": -1.0})
    (out / "rapt_curves.json").write_text(json.dumps(payload))
    resumed = curves(out, data, tiny_model_dir, "30", "20", resume=True)
    assert resumed[: len(first)] == first  # the finished rows, unchanged and not run again
    assert sorted((r["eta"], r["variant"]) for r in resumed[len(first):]) == [
        (20.0, "none"), (20.0, "reconstruction"), (20.0, "untrained")]
    assert all(r["accuracy"] >= 0 for r in resumed)
    assert "resuming rows of" in (out / "rapt_curves.md").read_text()
