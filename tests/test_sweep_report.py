"""`fedprompt run -m` (Hydra multirun) and `fedprompt report`: every job is checked before the first one
starts, each job runs in its Hydra folder, a failed job is reported and the sweep goes on, and the report
groups the runs by what varies except the seed. The simulation itself is replaced by a stub that writes a
run folder's files (a real run is in test_fl_simulation.py and test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedprompt import cli
from fedprompt.fl.launch import SimulationError
from tests.fl_support import tiny_overrides, write_secret_task


@pytest.fixture
def nothing_expensive(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a simulation started before the input was validated")

    monkeypatch.setattr("fedprompt.models.load_causal_lm", refuse)
    monkeypatch.setattr("fedprompt.fl.launch.local_superlink", refuse)


def _accuracy(alpha: float, seed: int, server_round: int) -> float:
    return round(0.5 + 0.1 * alpha + 0.01 * seed + 0.02 * server_round, 6)


def fake_run(cfg) -> dict:
    """What `fedprompt run` leaves in its folder, with accuracies that depend on alpha, seed and round."""
    alpha, seed, folder = float(cfg.partition.alpha), int(cfg.seed), Path(cfg.output_dir)
    if seed == 2 and alpha == 0.5:
        raise SimulationError("Flower run 1 ended 'finished:failed'")
    if seed == 2:
        raise RuntimeError("a bug in a job")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    rows = [{"round": r, "accuracy": _accuracy(alpha, seed, r)} for r in range(3)]
    (folder / "rounds.json").write_text(json.dumps(rows))
    summary = {"final_accuracy": rows[-1]["accuracy"], "initial_accuracy": rows[0]["accuracy"], "manual_accuracy": 0.5,
               "queries_per_client_round": 48.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    record = {**summary, "output_dir": str(folder), "wall_s": 1.0}
    (folder / "result.json").write_text(json.dumps(record))
    return record


def test_a_sweep_runs_every_job_in_its_folder_goes_on_after_failures_and_is_reported(
        capsys, tmp_path, tiny_model_dir, nothing_expensive, monkeypatch):
    monkeypatch.setattr("fedprompt.fl.run.cmd_run", fake_run)
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
    by_alpha = {row["partition.alpha"]: row for row in report["table"]}
    assert by_alpha[0.5]["completed"] == 2 and by_alpha[0.5]["failed"] == 1 and by_alpha[0.5]["seeds"] == "0 1"
    assert by_alpha[0.5]["final_accuracy_mean"] == pytest.approx(0.595)
    assert by_alpha[0.5]["final_accuracy_std"] == pytest.approx(0.01 / 2 ** 0.5)
    assert by_alpha[1.0]["initial_accuracy_mean"] == pytest.approx(0.605)
    assert "0.595 ± 0.007" in (sweep / "report" / "report.md").read_text() and "0.595 ± 0.007" in out
    for name in ("report.csv", "runs.csv", "accuracy_vs_alpha.png", "accuracy_per_round.png"):
        assert (sweep / "report" / name).stat().st_size > 0, name

    assert cli.main(["report", str(jobs[0])]) == 0  # one run folder (alpha 0.5, seed 0)
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["runs"] == 1 and single["grouped_by"] == [] and single["table"][0]["final_accuracy_mean"] == 0.59


@pytest.mark.parametrize(
    "args, message",
    [
        (["seed=0,1", "+federation.roundz=1"], "unknown config key 'federation.roundz'"),
        (["partition=dirichlet", "partition.alpha=1.0,0"], "job 1 (partition.alpha=0): Dirichlet alpha must be > 0"),
        (["seed=0,1", "federation.rounds=1,abc"], "bad value for federation.rounds"),
        (["seed=0,1", "output_dir=somewhere"], "set hydra.sweep.dir=<folder>, not output_dir"),
        (["seed=0,1", "resume=true"], "resume=true in a sweep needs hydra.sweep.dir"),
        (["model=smollm2-135m,org/other"], "a sweep cannot mix model files"),
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
