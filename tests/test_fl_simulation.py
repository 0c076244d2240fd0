"""One real simulation: `fedprompt run` -> `flwr run` -> Ray, 2 clients, 1 round, the tiny model.

It also audits the run: every client-to-server message the ServerApp received is written to
replies.jsonl (federation.audit_replies=true) and scanned for the clients' training text.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np

from fedprompt import cli
from tests.fl_support import find_leaks, tiny_overrides, write_secret_task

KEYS = {"final_accuracy", "rounds", "queries", "output_dir", "manual_accuracy", "initial_accuracy", "final_prompt",
        "bytes_up", "bytes_down", "eval_queries", "wall_s", "run_id", "num_clients", "failures",
        # the result protocol: both references, the one chosen on validation, what was scored, where it came from
        "zero_shot_accuracy", "reference_kind", "reference_accuracy", "reference_choice", "eval_split", "eval_n",
        "eval_ids_sha256", "predictions_file", "git_commit", "git_dirty", "config_sha256", "model_dtype"}


def test_two_clients_one_round_through_flwr_run(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "partition=dirichlet",
            "partition.alpha=1.0", "partition.k_shot=null", "federation.audit_replies=true", f"output_dir={out}"]
    code = cli.main(["run", *args])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert KEYS <= set(result)
    assert result["rounds"] == 1 and result["num_clients"] == 2 and result["failures"] == 0
    assert 0.0 <= result["final_accuracy"] <= 1.0
    assert result["model_dtype"] in ("float32", "bfloat16")  # what model.dtype=auto resolved to on this machine
    assert 0 < result["queries"] <= 2 * 60  # two clients, method.search.budget=60 each
    assert result["bytes_up"] > 0 and result["bytes_down"] > 0
    assert Path(result["output_dir"]) == out.resolve()

    for name in ("summary.json", "rounds.json", "rounds.csv", "accuracy.png", "config.yaml", "partition.json",
                 "flower.log", "result.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1"]
    assert rows[1]["prompt"] == result["final_prompt"] and int(rows[1]["replies"]) == 2
    assert sum(json.loads((out / "partition.json").read_text())["sizes"]) == 16

    assert result["reference_kind"] in ("manual", "zero-shot") and result["reference_choice"]["split"] == "validation"
    assert result["reference_accuracy"] == result[f"{result['reference_kind'].replace('-', '_')}_accuracy"]
    with np.load(out / result["predictions_file"]) as predictions:
        assert set(predictions.files) == {"ids", "label", "manual", "zero_shot", "final"}
        assert all(len(predictions[k]) == result["eval_n"] == 8 for k in predictions.files)
        assert np.mean(predictions["final"] == predictions["label"]) == result["final_accuracy"]
        assert np.mean(predictions["zero_shot"] == predictions["label"]) == result["zero_shot_accuracy"]

    audit = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    # each node's answer to the partition query (once per run), then the two replies of round 1
    assert [row["type"] for row in audit] == ["query.partition"] * 2 + ["train"] * 2
    assert all(row["error"] is None for row in audit)
    for row in audit:
        wire = base64.b64decode(row["content"])
        assert (b"prompt" in wire) == (row["type"] == "train")  # the real payload was captured
        assert find_leaks(wire) == []
