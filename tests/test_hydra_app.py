"""`fedprompt run` as a Hydra app (fedprompt.commands.hydra_app): Hydra's public API only, no sys.argv swap, and
each job's checks (fedprompt.commands.run.prepare: data, partition, tokenizers) run once, not once before the
sweep and again in the job. The simulation is replaced by a stub (a real run is in test_fl_simulation.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fedprompt
from fedprompt import cli
from fedprompt.commands import run as fl_run
from fedprompt.commands.hydra_app import expand_jobs, task_overrides
from fedprompt.config import rewrite_shorthands
from tests.fl_support import tiny_overrides, write_secret_task

SOURCE = Path(fedprompt.__file__).parent


def test_fedprompt_uses_no_private_hydra_api_leaves_sys_argv_alone_and_holds_no_test_hook():
    private = re.compile(r"hydra\._internal|from\s+hydra\s+import\s+_internal|hydra/_internal")
    offenders = [str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py") if private.search(p.read_text())]
    assert offenders == [], f"hydra._internal is Hydra's private API: {offenders}"
    argv_swap = re.compile(r"sys\.argv\s*(\[[^\]]*\])?\s*=[^=]")
    assert [str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py") if argv_swap.search(p.read_text())] == []
    # test hooks live in tests/ (tests/hooks/sitecustomize.py), never in fedprompt
    assert [str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py") if "FEDPROMPT_TEST" in p.read_text()] == []


@pytest.fixture
def counted_runs(monkeypatch):
    """prepare() counted; the Flower run replaced by a result written in the run folder."""
    calls: list[int] = []
    real_prepare = fl_run.prepare

    def prepare(cfg):
        calls.append(int(cfg.seed))
        return real_prepare(cfg)

    class Outcome:
        status, run_id, details, elapsed_s = "finished:completed", 1, "", 0.0

    def finish_run(folder, outcome, start, checkpoint=None, code=None):
        record = {"output_dir": str(folder), "final_accuracy": 0.5}
        (folder / "result.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(fl_run, "prepare", prepare)
    monkeypatch.setattr(fl_run, "simulate", lambda *args, **kwargs: Outcome())
    monkeypatch.setattr(fl_run, "finish_run", finish_run)
    return calls


def test_prepare_runs_once_per_job_in_a_sweep(capsys, tmp_path, tiny_model_dir, nothing_expensive, counted_runs):
    sweep = tmp_path / "sweep"
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "seed=0,1,2",
            f"hydra.sweep.dir={sweep}"]
    assert cli.main(["run", "-m", *args]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["jobs"], summary["completed"]) == (3, 3)
    assert sorted(counted_runs) == [0, 1, 2]  # once a job: the check's result is reused by the job
    # Hydra's folders: multirun.yaml, one numbered folder a job with .hydra/, in the order expand_jobs gives
    assert OmegaConf.load(sweep / "multirun.yaml").hydra.mode == "MULTIRUN"
    expected = [list(task_overrides(job)) for job in expand_jobs(rewrite_shorthands(args), multirun=True)]
    for number, job in enumerate(expected):
        folder = sweep / str(number)
        assert list(OmegaConf.load(folder / ".hydra" / "overrides.yaml")) == job
        assert OmegaConf.load(folder / "config.yaml").seed == number
        assert (folder / "partition.json").is_file() and (folder / "result.json").is_file()

    # resume=true of the sweep: the same job folders, each job checked and prepared once again
    counted_runs.clear()
    assert cli.main(["run", "-m", *args, "resume=true"]) == 0, capsys.readouterr().err
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["sweep_dir"] == str(sweep.resolve()) and resumed["completed"] == 3
    assert sorted(counted_runs) == [0, 1, 2]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert all(OmegaConf.load(sweep / str(n) / "config.yaml").resume is True for n in range(3))


def test_prepare_runs_once_in_a_single_run(capsys, tmp_path, tiny_model_dir, nothing_expensive, counted_runs):
    out = tmp_path / "out"
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), f"output_dir={out}"]
    assert cli.main(["run", *args]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output_dir"] == str(out.resolve())
    assert counted_runs == [0]
    assert (out / ".hydra" / "hydra.yaml").is_file() and (out / "partition.json").is_file()


def test_expand_jobs_is_the_basic_sweepers_order():
    jobs = expand_jobs(["a=1,2", "b=x", "c=3,4", "a=5,6"], multirun=True)  # a repeated key keeps its place
    assert jobs == [["a=5", "b=x", "c=3"], ["a=5", "b=x", "c=4"], ["a=6", "b=x", "c=3"], ["a=6", "b=x", "c=4"]]
    assert expand_jobs(["a=1,2"], multirun=False) == [["a=1,2"]]
    assert expand_jobs(["seed=range(0,2)", "partition=glob(i*)"], multirun=True) == [
        ["seed=0", "partition=iid"], ["seed=1", "partition=iid"]]  # glob: conf/'s options of the group


@pytest.mark.parametrize("args, message", [
    (["--info"], "unrecognized arguments: --info"),
    (["-m", "--cfg", "job"], "only one of --run, --multirun and --cfg"),
    (["--resolve"], "--resolve and --package go with --cfg"),
])
def test_a_bad_flag_is_one_line(capsys, args, message):
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cfg_prints_the_composed_config(capsys):
    assert cli.main(["run", "--cfg", "job", "federation.rounds=7", "-p", "federation"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# @package federation\n") and "rounds: 7" in out
    assert cli.main(["run", "--cfg", "hydra"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).hydra.job.name == "run"
