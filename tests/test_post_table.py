"""simulations/post_table.py's resumable table: rows that used a student are run again for another student,
and --reuse-large takes only the large-model rows of a finished table with the same settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("post_table", REPO / "simulations" / "post_table.py")
post_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(post_table)


def _info(tmp_path, **changes):
    args = vars(post_table.parse_args(["--task", "agnews", "--out", str(tmp_path)]))
    return {"task": "agnews", "args": {**args, **changes}}


def _finished_table(path: Path, info: dict) -> None:
    rows = [
        {"stage": "large zero-shot", "epsilon": None, "accuracy": 0.54, "wall_s": 25.0},
        {"stage": "direct (large, central)", "epsilon": "inf", "accuracy": 0.85, "wall_s": 1283.0},
        {"stage": "student (federated)", "epsilon": "inf", "accuracy": 0.23, "wall_s": 212.0, "student": "old"},
        {"stage": "POST transfer", "epsilon": "inf", "accuracy": 0.51, "wall_s": 146.0, "student": "old"},
        {"stage": "direct (large, central)", "epsilon": "8", "accuracy": 0.81, "wall_s": 1500.0},
    ]
    path.write_text(json.dumps({**info, "alpha_zero_shot": {"accuracy": 0.5, "seconds": 9.0}, "rows": rows}))


def test_reuse_large_takes_the_large_rows_only(tmp_path):
    finished = tmp_path / "post_agnews.json"
    _finished_table(finished, _info(tmp_path))
    table = post_table.Table(tmp_path / "new" / "post_agnews.partial.json", _info(tmp_path, student="/s2"))
    (tmp_path / "new").mkdir()
    table.reuse_large(finished)
    assert sorted((r["stage"], r["epsilon"]) for r in table.rows) == [
        ("direct (large, central)", "8"), ("direct (large, central)", "inf"), ("large zero-shot", None)]
    assert all(r["reused_from"] == str(finished) for r in table.rows)
    assert table.info["alpha_zero_shot"]["accuracy"] == 0.5
    # saved at once: a run that stops later resumes with them
    assert len(json.loads(table.path.read_text())["rows"]) == 3


def test_reuse_large_refuses_a_table_with_other_settings(tmp_path):
    finished = tmp_path / "post_agnews.json"
    _finished_table(finished, _info(tmp_path, rounds=5))
    table = post_table.Table(tmp_path / "post_agnews.partial.json", _info(tmp_path))
    with pytest.raises(SystemExit, match=r"differ in \['rounds'\]"):
        table.reuse_large(finished)
    assert table.rows == []


def test_rows_of_another_student_are_dropped_and_run_again(tmp_path):
    path = tmp_path / "post_agnews.partial.json"
    _finished_table(path, _info(tmp_path))
    table = post_table.Table(path, _info(tmp_path))
    assert len(table.rows) == 5  # same settings: resumed
    assert table.current("student (federated)", "inf", student="old")["accuracy"] == 0.23
    assert table.current("student (federated)", "inf", student="new") is None
    assert not any(r["stage"] == "student (federated)" for r in table.rows)
    assert table.done("direct (large, central)", "inf")  # the large rows stay


def test_markdown_lists_resumed_rows_in_pipeline_order(tmp_path):
    rows = [
        {"stage": "direct (large, central)", "epsilon": "8", "accuracy": 0.81, "wall_s": 1.0, "reused_from": "t.json"},
        {"stage": "POST transfer", "epsilon": "inf", "accuracy": 0.5, "wall_s": 1.0, "alpha": 1.0,
         "student_prompt_accuracy": 0.3},
        {"stage": "large zero-shot", "epsilon": None, "accuracy": 0.54, "wall_s": 1.0},
        {"stage": "direct (large, central)", "epsilon": "inf", "accuracy": 0.85, "wall_s": 1.0},
    ]
    record = {"task": "agnews", "model": "m", "machine": "cpu", "manual_prompt": "p", "eval_n": 1, "train_examples": 1,
              "public": "agnews/validation", "public_n": 1, "total_steps": 1, "total_wall_s": 4.0, "rows": rows,
              "summary": {}, "reused_wall_s": 1.0}
    text = post_table.markdown(record)
    assert "| direct (large, central) * | 8 |" in text and "1 s of it in rows reused" in text
    stages = [line.split("|")[1].strip().rstrip(" *") + " " + line.split("|")[2].strip()
              for line in text.splitlines() if line.startswith("| ") and "accuracy" not in line]
    assert stages[:4] == ["large zero-shot -", "direct (large, central) inf", "POST transfer inf",
                          "direct (large, central) 8"]


def test_a_finished_table_resumes_when_there_is_no_partial_one(tmp_path):
    finished = tmp_path / "post_agnews.json"
    _finished_table(finished, _info(tmp_path))
    table = post_table.Table(tmp_path / "post_agnews.partial.json", _info(tmp_path), finished=finished)
    assert len(table.rows) == 5
    transfer = {"transfer": {"transfer_init": "student"}, "student": "old"}
    assert table.current("POST transfer", "inf", **transfer) is None  # another transfer setting: rerun it alone
    assert table.done("student (federated)", "inf", student="old")
    other = post_table.Table(tmp_path / "x.partial.json", _info(tmp_path, rounds=9), finished=finished)
    assert other.rows == []  # other settings: start afresh


def test_the_label_word_ablation_has_its_own_row_name_and_old_transfer_rows_run_again(tmp_path):
    assert post_table.parse_args([]).transfer_logits == "vocab"  # POST's KL over the whole vocabulary
    rows = [{"stage": "POST transfer", "epsilon": "inf", "accuracy": 0.5, "wall_s": 1.0, "alpha": 1.0,
             "student_prompt_accuracy": 0.3, "transfer": {"transfer_logits": "labels"}},
            {"stage": "POST transfer", "epsilon": "8", "accuracy": 0.5, "wall_s": 1.0, "alpha": 1.0,
             "student_prompt_accuracy": 0.3, "transfer": {"transfer_logits": "vocab"}}]
    record = {"task": "agnews", "model": "m", "machine": "cpu", "manual_prompt": "p", "eval_n": 1, "train_examples": 1,
              "public": "agnews/validation", "public_n": 1, "total_steps": 1, "total_wall_s": 2.0, "rows": rows,
              "summary": {}}
    text = post_table.markdown(record)
    assert "| POST transfer (label-word KL) | inf |" in text and "| POST transfer | 8 |" in text
    # a finished table's transfer rows from before transfer_logits existed (label words) are not current
    finished = tmp_path / "post_agnews.json"
    _finished_table(finished, _info(tmp_path))
    table = post_table.Table(tmp_path / "post_agnews.partial.json", _info(tmp_path), finished=finished)
    args = post_table.parse_args(["--task", "agnews"])
    settings = {"transfer": {k: getattr(args, k) for k in post_table.TRANSFER_ARGS}, "student": "old"}
    assert "transfer_logits" in settings["transfer"]
    assert table.current("POST transfer", "inf", **settings) is None
