"""`fedprompt run -m` (Hydra multirun) and `fedprompt report`: every job is checked before the first one
starts, each job runs in its Hydra folder, a failed job is reported and the sweep goes on, and the report
groups the runs by what varies except the seed. The simulation itself is replaced by a stub that writes a
run folder's files (a real run is in test_fl_simulation.py and test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedprompt import cli
from fedprompt.commands.launch import SimulationError
from fedprompt.data import Example
from fedprompt.data.leakage import content_ids, ids_digest
from tests.fl_support import tiny_overrides, write_secret_task

N = 40  # evaluation examples of the fake runs


def _correct(alpha: float, seed: int) -> np.ndarray:
    """Which of the N examples the final prompt gets right: 20 + 8 * alpha + seed of them."""
    return np.arange(N) < 20 + int(8 * alpha) + seed


def fake_run(cfg, partition=None) -> dict:
    """What `fedprompt run` leaves in its folder: accuracies that depend on alpha, seed and round, and
    per-example predictions (the manual prompt, the reference, is right on the first 20 examples)."""
    alpha, seed, folder = float(cfg.partition.alpha), int(cfg.seed), Path(cfg.output_dir)
    if seed == 2 and alpha == 0.5:
        raise SimulationError("Flower run 1 ended 'finished:failed'")
    if seed == 2:
        raise RuntimeError("a bug in a job")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    label = np.zeros(N, dtype=np.int16)
    final = np.where(_correct(alpha, seed), 0, 1).astype(np.int16)
    manual = np.where(np.arange(N) < 20, 0, 1).astype(np.int16)
    zero_shot = np.ones(N, dtype=np.int16)
    ids = content_ids([Example(f"sentence {i}", 0) for i in range(N)])
    np.savez(folder / "predictions.npz", ids=ids, label=label, final=final, manual=manual, zero_shot=zero_shot)
    accuracy = float(np.mean(final == label))
    rows = [{"round": r, "accuracy": 0.5 + r * (accuracy - 0.5) / 2} for r in range(3)]
    (folder / "rounds.json").write_text(json.dumps(rows))
    summary = {"task": "secret", "eval_split": "test", "eval_n": N, "eval_ids_sha256": ids_digest(ids),
               "final_accuracy": accuracy, "initial_accuracy": 0.5, "manual_accuracy": 0.5, "zero_shot_accuracy": 0.0,
               "reference_kind": "manual", "reference_accuracy": 0.5, "predictions_file": "predictions.npz",
               "queries_per_client_round": 48.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    record = {**summary, "output_dir": str(folder), "wall_s": 1.0}
    (folder / "result.json").write_text(json.dumps(record))
    return record


def _sweep(tmp_path, tiny_model_dir, capsys, monkeypatch) -> Path:
    monkeypatch.setattr("fedprompt.commands.run.cmd_run", fake_run)
    sweep = tmp_path / "sweep"
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "partition=dirichlet",
            "partition.alpha=0.5,1.0", "seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    code = cli.main(["run", "-m", *args])
    out, err = capsys.readouterr()
    assert code == 1  # two jobs failed, the other four ran
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["jobs"] == 6 and summary["completed"] == 4 and summary["failed"] == 2
    assert json.loads((sweep / "sweep.json").read_text())["failed"] == 2
    assert "ended 'finished:failed'" in err and "RuntimeError: a bug in a job" in err
    return sweep


def test_a_sweep_runs_every_job_in_its_folder_goes_on_after_failures_and_is_reported(
        capsys, tmp_path, tiny_model_dir, nothing_expensive, monkeypatch):
    sweep = _sweep(tmp_path, tiny_model_dir, capsys, monkeypatch)
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3", "4", "5"]  # Hydra's job folders, in launch order
    assert all((p / ".hydra" / "overrides.yaml").is_file() for p in jobs)
    assert sorted(p.name for p in jobs if (p / "error.json").is_file()) == ["2", "5"]
    assert OmegaConf.load(jobs[0] / "config.yaml").output_dir == str(jobs[0])  # the run folder is Hydra's

    assert cli.main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["grouped_by"] == ["partition.alpha"]
    assert (report["runs"], report["completed"], report["failed"]) == (6, 4, 2)
    groups = json.loads((sweep / "report" / "report.json").read_text())
    assert groups == report["groups"]
    by_alpha = {g["group"]["partition.alpha"]: g for g in groups}
    half = by_alpha[0.5]
    assert (half["n_seeds"], half["seeds"], half["completed"], half["failed"]) == (2, [0, 1], 2, 1)
    assert half["eval_split"] == "test" and half["eval_n"] == N
    # seeds 0 and 1 get 24 and 25 of 40 right: mean 0.6125, t(1) interval 0.6125 +- 12.706 * 0.0125
    assert half["final_accuracy"]["mean"] == pytest.approx(0.6125)
    assert half["final_accuracy"]["ci95"] == pytest.approx([0.6125 - 12.7062 * 0.0125, 0.6125 + 12.7062 * 0.0125], abs=1e-4)
    assert half["reference"] == {"kind": "manual", "accuracy": 0.5}
    assert half["gain"]["mean"] == pytest.approx(0.1125)  # (4 + 0.5) / 40: the seeds' gains averaged per example
    low, high = half["gain"]["ci95"]
    assert 0 < low < 0.1125 < high and half["gain"]["p_value"] < 0.05
    assert "0.613 [" in (sweep / "report" / "report.md").read_text() and "+0.113" in out
    for name in ("report.csv", "runs.csv", "accuracy_vs_alpha.png", "accuracy_per_round.png"):
        assert (sweep / "report" / name).stat().st_size > 0, name

    assert cli.main(["report", str(jobs[0])]) == 0  # one run folder (alpha 0.5, seed 0): no interval, not a zero one
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (group,) = single["groups"]
    assert single["runs"] == 1 and single["grouped_by"] == [] and group["n_seeds"] == 1
    assert group["final_accuracy"] == {"mean": 0.6, "ci95": None}
    assert "CI undefined (1 seed)" in (jobs[0] / "report" / "report.md").read_text()


@pytest.mark.parametrize("tamper, message", [
    (lambda d: d.update(final=d["final"][:-1]), "summary.json says eval_n=40"),
    (lambda d: d.update(ids=d["ids"][::-1].copy()), "example ids differ"),
    (lambda d: d.update(final=np.zeros_like(d["final"])), "its 'final' predictions score 1.0000"),
    (lambda d: d.pop("manual"), "lacks ['manual']"),
])
def test_a_tampered_predictions_file_is_refused_in_one_line(capsys, tmp_path, tiny_model_dir, nothing_expensive,
                                                            monkeypatch, tamper, message):
    sweep = _sweep(tmp_path, tiny_model_dir, capsys, monkeypatch)
    path = sweep / "1" / "predictions.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    tamper(arrays)
    np.savez(path, **arrays)
    assert cli.main(["report", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_a_group_that_mixes_evaluation_splits_or_tasks_is_refused(capsys, tmp_path, tiny_model_dir, nothing_expensive,
                                                                  monkeypatch):
    sweep = _sweep(tmp_path, tiny_model_dir, capsys, monkeypatch)
    for field, value, what in (("eval_split", "validation", "mixes evaluation splits"), ("task", "other", "mixes tasks")):
        path = sweep / "1" / "summary.json"
        original = path.read_text()
        path.write_text(json.dumps({**json.loads(original), field: value}))
        assert cli.main(["report", str(sweep)]) == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1
        path.write_text(original)


@pytest.mark.parametrize(
    "args, message",
    [
        (["seed=0,1", "+federation.roundz=1"], "unknown config key 'federation.roundz'"),
        (["partition=dirichlet", "partition.alpha=1.0,0"], "job 1 (partition.alpha=0): Dirichlet alpha must be > 0"),
        (["seed=0,1", "federation.rounds=1,abc"], "federation.rounds must be a whole number"),
        (["seed=0,1", "output_dir=somewhere"], "set hydra.sweep.dir=<folder>, not output_dir"),
        (["seed=0,1", "resume=true"], "resume=true in a sweep needs hydra.sweep.dir"),
        (["model=smollm2-135m,org/other"], "a sweep cannot mix model files"),
        (["seed=0,1", "service.api_key=sk-1,sk-2"], "service.api_key takes one value, not a sweep"),
        (["seed=0,1", "federation.superlink_port=70000"], "job 0 (seed=0): federation.superlink_port must be >= 0"),
    ],
)
def test_a_bad_sweep_fails_before_any_job_starts(capsys, tmp_path, tiny_model_dir, nothing_expensive, monkeypatch,
                                                 args, message):
    monkeypatch.chdir(tmp_path)  # Hydra's default folders would be here
    overrides = [o for o in tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir)
                 if not (o.startswith("model=") and "model=" in " ".join(args))]
    code = cli.main(["run", "-m", *overrides, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "somewhere").exists()


def test_report_errors(capsys, tmp_path):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no run under" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path), "colour=red"]) == 2
    assert "takes <folder> [out=<folder>]" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")  # started, never finished
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no finished run under" in capsys.readouterr().err
