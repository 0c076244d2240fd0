"""simulations/post_table.py's resumable table: rows that used a student are run again for another student,
and --reuse-large takes only the large-model rows of a finished table with the same settings."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("post_table", REPO / "simulations" / "post_table.py")
post_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(post_table)
spec_h = importlib.util.spec_from_file_location("post_headline", REPO / "simulations" / "post_headline.py")
post_headline = importlib.util.module_from_spec(spec_h)
spec_h.loader.exec_module(post_headline)  # imports post_table again, by name, from simulations/


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


def test_a_resumed_table_names_every_machine_its_rows_were_made_on(tmp_path):
    path = tmp_path / "post_agnews.partial.json"
    _finished_table(path, {**_info(tmp_path), "machine": "2 CPUs (x86_64), no GPU, bfloat16, load average 1.0 at start"})
    here = post_table.machine("cpu", "float32")
    assert here.startswith(f"{os.cpu_count()} CPUs") and "no GPU, float32, load average" in here
    table = post_table.Table(path, {**_info(tmp_path), "machine": here})
    before = "2 CPUs (x86_64), no GPU, bfloat16, load average 1.0 at start"
    assert table.info["machine"] == before  # a start that only rewrites the summary made no row here
    table.add("POST transfer", "8", 0.5, 1.0)
    table.add("student (federated)", "8", 0.3, 1.0)
    assert table.info["machine"] == f"{before}; {here}"  # named once, by the start's first row
    assert json.loads(path.read_text())["machine"] == f"{before}; {here}"
    fresh = post_table.Table(tmp_path / "new.partial.json", {**_info(tmp_path), "machine": here})
    assert fresh.info["machine"] == here


def test_a_federated_stage_stopped_mid_run_is_resumed_not_refused(tmp_path):
    from fedprompt.fl.checkpoint import CHECKPOINT

    run_dir = tmp_path / "post_sst2_student_epsinf"
    assert not post_table.interrupted(run_dir)  # nothing there: a new run
    run_dir.mkdir()
    (run_dir / CHECKPOINT).write_text("{}")
    assert post_table.interrupted(run_dir)  # `fedprompt run` would refuse it without resume=true
    (run_dir / "result.json").write_text("{}")
    assert not post_table.interrupted(run_dir)  # finished: run again from round 0 (its result is replaced)


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


def _seed_record(seed: int, reference_kind: str = "zero-shot") -> dict:
    """A finished table of one seed: 4 test examples, the reference (no instruction) gets 2 right."""
    rows = [
        {"stage": "large zero-shot", "epsilon": None, "accuracy": 0.25, "correct": "1000"},
        {"stage": "large no instruction", "epsilon": None, "accuracy": 0.5, "correct": "1100"},
    ]
    for tag, (direct, post) in {"inf": ("1111", "1110"), "8": ("1110", "1100" if seed else "1000")}.items():
        rows += [
            {"stage": "direct (large, central)", "epsilon": tag, "accuracy": direct.count("1") / 4, "correct": direct,
             "compute_s": 10.0, "flops": 100.0, "epsilon_spent": None if tag == "inf" else 8.0,
             "delta": None if tag == "inf" else 1e-5},
            {"stage": "student (federated)", "epsilon": tag, "accuracy": 0.4, "compute_s": 2.0, "flops": 20.0,
             "epsilon_per_client": None if tag == "inf" else [7.9, 8.0 - seed / 100],
             "delta_per_client": None if tag == "inf" else [1e-5, 1e-5]},
            {"stage": "student prompt pasted on large", "epsilon": tag, "accuracy": 0.3, "correct": "1000"},
            {"stage": "POST transfer", "epsilon": tag, "accuracy": post.count("1") / 4, "correct": post,
             "compute_s": 1.0, "flops": 10.0},
        ]
    table = post_table.Table.__new__(post_table.Table)
    table.rows, table.info = rows, {"reference": {"kind": reference_kind, "validation": {"manual": 0.3, "zero-shot": 0.6},
                                                  "validation_n": 500}}
    args = post_table.parse_args(["--task", "agnews"])
    return {**table.info, "task": "agnews", "model": "m", "eval_n": 4, "args": vars(args), "rows": rows,
            "summary": post_table.derive(table, args)}


def test_gap_recovered_is_measured_against_the_reference_chosen_on_validation():
    summary = _seed_record(0)["summary"]
    # reference no instruction 0.5; direct 1.0, POST 0.75 at inf: half the gap; POST's own ZS (manual, 0.25): 2/3
    assert summary["inf"]["reference"] == "zero-shot"
    assert summary["inf"]["gap_recovered"] == 0.5 and summary["inf"]["gap_recovered_vs_manual"] == 0.667
    assert summary["8"]["gap_recovered"] == -1.0  # 0.25 against 0.5, direct 0.75
    assert summary["inf"]["cost_ratio_flops"] == 0.3 and summary["inf"]["cost_ratio_time"] == 0.3


def test_the_headline_summary_pairs_gains_and_reports_every_clients_epsilon():
    summary = post_headline.summarise([_seed_record(s) for s in (0, 1, 2)], [0, 1, 2])
    assert summary["gap_recovered"]["inf"] == 0.5 and summary["gap_recovered_ci95"]["inf"] == [0.5, 0.5]
    assert summary["gap_recovered_per_seed"]["8"] == [-1.0, 0.0, 0.0]
    low, high = summary["gap_recovered_ci95"]["8"]
    assert low < -1 / 3 < high
    post_gain = summary["gains"]["inf"]["POST transfer"]
    assert post_gain["mean"] == 0.25  # example 3 right in every seed, none lost
    assert summary["epsilon"]["8"]["max"] == 8.0 and summary["delta"]["8"]["max"] == 1e-5
    assert summary["epsilon"]["inf"] is None and summary["cost_ratio"] == 0.3
    assert "| inf | 0.50 [0.50, 0.50] |" in post_headline.markdown(summary)
    with pytest.raises(ValueError, match="different references"):
        post_headline.summarise([_seed_record(0), _seed_record(1, "manual")], [0, 1])
    other = _seed_record(2)
    other["args"]["rounds"] = 9
    with pytest.raises(ValueError, match=r"different settings: \['rounds'\]"):
        post_headline.summarise([_seed_record(0), _seed_record(1), other], [0, 1, 2])


def test_the_headline_is_written_again_from_finished_seeds_without_a_model(tmp_path):
    for seed in (0, 1, 2):
        folder = tmp_path / "post_agnews" / f"seed_{seed}"
        folder.mkdir(parents=True)
        (folder / "post_agnews.json").write_text(json.dumps({**_seed_record(seed), "machine": f"box {seed}"}))
    summary = post_headline.main(["--task", "agnews", "--summary-only", "--out", str(tmp_path)])
    assert summary["gap_recovered"]["inf"] == 0.5 and summary["machine"] == ["box 0", "box 1", "box 2"]
    assert json.loads((tmp_path / "post_agnews.json").read_text())["gap_recovered"]["inf"] == 0.5
    assert "Seed 2's machine: box 2." in (tmp_path / "post_agnews.md").read_text()
    with pytest.raises(SystemExit, match="drop --rounds 5"):
        post_headline.main(["--task", "agnews", "--summary-only", "--out", str(tmp_path), "--rounds", "5"])
    (tmp_path / "post_agnews" / "seed_1" / "post_agnews.json").unlink()
    with pytest.raises(SystemExit, match="no finished table in .*seed_1"):
        post_headline.main(["--task", "agnews", "--summary-only", "--out", str(tmp_path)])


def test_the_headline_wants_three_seeds_and_owns_the_seed():
    for argv in (["--task", "sst2", "--seeds", "0", "1"], ["--task", "sst2", "--set", "seed=3"]):
        with pytest.raises(SystemExit):
            post_headline.parse_args(argv)
    args, rest = post_headline.parse_args(["--task", "sst2", "--rounds", "5"])
    assert args.seeds == [0, 1, 2] and rest == ["--rounds", "5"]


def _task_with_a_train_row_in_test(tiny_data: Path) -> Path:
    train = tiny_data / "toy" / "train.jsonl"
    test_row = (tiny_data / "toy" / "test.jsonl").read_text().splitlines()[3]
    train.write_text(train.read_text() + test_row + "\n")
    return tiny_data


def test_direct_tunings_examples_are_checked_for_the_test_rows_before_any_model_loads(tiny_data, nothing_expensive,
                                                                                      tmp_path):
    from fedprompt.errors import DataError

    data = _task_with_a_train_row_in_test(tiny_data)

    def argv(eval_limit: int, *overrides: str) -> list[str]:
        return ["--task", "toy", "--stages", "direct", "--eval-limit", str(eval_limit),
                "--out", str(tmp_path / f"out{eval_limit}"), "--set", f"data_dir={data}",
                *(a for o in overrides for a in ("--set", o))]

    with pytest.raises(DataError, match=r"training examples \(train split\): 1 of its 13 examples"):
        post_table.main(argv(6))
    # Under eval_overlap=exclude the row is dropped and the table goes on, to the model (refused by the fixture).
    with pytest.raises(AssertionError, match="a model was loaded"):
        post_table.main(argv(6, "federation.eval_overlap=exclude"))
    # A test row beyond --eval-limit is not evaluated on, so it does not count.
    with pytest.raises(AssertionError, match="a model was loaded"):
        post_table.main(argv(2))
