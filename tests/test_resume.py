"""Resume: a run stopped between rounds continues from its last completed round and ends exactly as the
uninterrupted run with the same seed. The mechanism alone (a toy strategy that draws from the global
RNG and keeps state, clients' context.state on disk), then a real `fedprompt run` stopped after round 1
of 3 (SIGTERM to the launcher, or SIGKILL to the launcher's process group): every process of the run is
gone within seconds, status.json says where it stopped, and `fedprompt resume` ends as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fedprompt import cli
from fedprompt.fl.checkpoint import CheckpointedRounds, restore_client_state, save_client_state
from fedprompt.runs.report import RunReport
from tests.fl_support import MARK_ENV, marked_processes, tiny_overrides, wait_until_gone, write_secret_task

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: the server pauses after checkpointing PAUSE_ENV's round
PAUSE_ENV = "FEDPROMPT_TEST_PAUSE_AFTER_ROUND"


class NoisyStrategy(Strategy):
    """Adds a draw of NumPy's global RNG and a running count (its own state) to the arrays each round."""

    def __init__(self) -> None:
        self.count = 0

    def summary(self) -> None:
        pass

    def configure_train(self, server_round, arrays, config, grid):
        self.arrays = arrays
        return []

    def aggregate_train(self, server_round, replies):
        self.count += server_round
        value = self.arrays["x"].numpy() + np.random.normal(size=2) + self.count
        return ArrayRecord({"x": Array(value)}), None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def checkpoint_state(self) -> RecordDict:
        return RecordDict({"state": ConfigRecord({"count": self.count})})

    def restore_state(self, state: RecordDict) -> None:
        self.count = int(state["state"]["count"])


class NoGrid:
    def send_and_receive(self, messages, timeout=None):
        return list(messages)


class Stopped(Exception):
    pass


def _rounds(folder: Path, resume: bool, stop_at: int | None = None):
    cfg = OmegaConf.create({"seed": 0, "resume": resume, "output_dir": str(folder), "federation": {"rounds": 4}})
    report = RunReport(folder, {"method": "toy"})
    strategy = NoisyStrategy()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == stop_at:
            raise Stopped  # as if killed while this round ran: its checkpoint is never written
        value = float(arrays["x"].numpy().sum())
        report.add(server_round, [f"{value:.12f}"], value, 1, 0, 0.0)
        return MetricRecord({"value": value})

    np.random.seed(0)  # the server's setup
    CheckpointedRounds(cfg, folder, report, strategy).start(
        NoGrid(), ArrayRecord({"x": Array(np.zeros(2))}), num_rounds=4, timeout=1.0, evaluate_fn=evaluate)
    return [r["prompt"] for r in report.rows], strategy.count


def test_checkpointed_rounds_resume_to_the_same_end(tmp_path):
    whole = _rounds(tmp_path / "whole", resume=False)
    with pytest.raises(Stopped):
        _rounds(tmp_path / "stopped", resume=False, stop_at=3)
    assert json.loads((tmp_path / "stopped" / "checkpoint.json").read_text())["round"] == 2
    np.random.seed(123)  # whatever the resumed process drew before does not matter: the RNG state is restored
    assert _rounds(tmp_path / "stopped", resume=True) == whole
    assert len(whole[0]) == 5 and whole[1] == 1 + 2 + 3 + 4


def test_client_state_is_restored_from_the_newest_earlier_round(tmp_path):
    cfg = OmegaConf.create({"output_dir": str(tmp_path)})
    context = SimpleNamespace(node_config={"partition-id": 3}, state=RecordDict())
    for server_round in (1, 2, 4):
        context.state["acct"] = ConfigRecord({"steps": server_round * 10})
        save_client_state(cfg, context, server_round)
    assert sorted(p.name for p in (tmp_path / "clients" / "3").iterdir()) == ["state-2.bin", "state-4.bin"]

    fresh = SimpleNamespace(node_config={"partition-id": 3}, state=RecordDict())  # a resumed run's context
    restore_client_state(cfg, fresh, server_round=4)  # round 4 is redone: the state after round 2
    assert fresh.state["acct"]["steps"] == 20
    restore_client_state(cfg, fresh, server_round=5)
    assert fresh.state["acct"]["steps"] == 40
    other = SimpleNamespace(node_config={"partition-id": 0}, state=RecordDict())
    restore_client_state(cfg, other, server_round=5)
    assert len(other.state) == 0


def _wait_for_round(folder: Path, server_round: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / "checkpoint.json").read_text())["round"] >= server_round:
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        assert proc.poll() is None, f"the run ended before round {server_round}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint of round {server_round} after {timeout_s} s")


def _trajectory(folder: Path) -> list[tuple]:
    rows = json.loads((folder / "rounds.json").read_text())
    return [(r["round"], r["accuracy"], r["prompt"], r.get("client_prompts"), r["queries"]) for r in rows]


def _rounds_json_but_timings(folder: Path) -> list:
    """rounds.json without its seconds (train_s, wall_s, the clients' search-s, ...): all else must be equal."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith(("_s", "-s"))}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(json.loads((folder / "rounds.json").read_text()))


def _start_paused(args: list[str], folder: Path, mark: str) -> subprocess.Popen:
    """`fedprompt run` into ``folder``, its processes marked with ``mark``, waiting after round 1's checkpoint."""
    path = os.pathsep.join([str(REPO), str(HOOKS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, PAUSE_ENV: "1", "PYTHONPATH": path, MARK_ENV: mark}
    proc = subprocess.Popen([sys.executable, "-m", "fedprompt.cli", "run", *args, f"output_dir={folder}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_round(folder, 1, proc)
    commands = " ".join(" ".join(p.cmdline()) for p in marked_processes(mark))
    for part in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "ClientAppActor", "flwr run"):
        assert part in commands, f"no {part} among the run's processes: the check below would prove nothing"
    return proc


def _stop(proc: subprocess.Popen, folder: Path, mark: str, kill_group: bool) -> None:
    """SIGTERM to the launcher (`kill <pid>`): every process of the run gone within 10 s, the launcher too, and it
    says where it stopped; or SIGKILL to the launcher's group (`kill -9 -<pgid>`): the watchdog's work, 30 s.
    Either way status.json says "interrupted at round 1", and the folder holds nothing of a later round."""
    try:
        if kill_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        gone_s = wait_until_gone(mark, within_s=30 if kill_group else 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"every process of the run gone {gone_s:.1f} s after the {'SIGKILL' if kill_group else 'SIGTERM'}")
    err = proc.stderr.read()
    if kill_group:
        assert proc.wait() == -signal.SIGKILL
    else:  # one line, no traceback, and a shell's code for a stop by SIGTERM
        assert proc.wait() == 128 + signal.SIGTERM, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("fedprompt run: interrupted at round 1 of 3 by SIGTERM;"), err
        assert "Traceback" not in err
    status = json.loads((folder / "status.json").read_text())
    by = "the launcher's death" if kill_group else "SIGTERM"
    assert (status["state"], status["round"], status["num_rounds"], status["by"]) == ("interrupted", 1, 3, by)
    assert status["message"].endswith(f"continue with `fedprompt resume {folder}`")
    assert json.loads((folder / "checkpoint.json").read_text())["round"] == 1
    assert len(json.loads((folder / "rounds.json").read_text())) == 2  # rounds 0 and 1: nothing ran on
    assert not (folder / "summary.json").exists() and not (folder / "result.json").exists()


def _run_stopped_after_round_1(args: list[str], whole: Path, stopped: Path, capsys, kill_group: bool = False) -> None:
    """``whole`` uninterrupted; ``stopped`` stopped after round 1 (see _stop) and not yet resumed."""
    assert cli.main(["run", *args, f"output_dir={whole}"]) == 0, capsys.readouterr().err[-3000:]
    mark = uuid.uuid4().hex
    _stop(_start_paused(args, stopped, mark), stopped, mark, kill_group)


def test_sigterm_stops_every_process_of_the_run_within_10_s(tmp_path, tiny_model_dir):
    """`kill <launcher pid>` after round 1 of 3: SuperLink, SuperExec, flwr-simulation, Ray, `flwr run` and the
    launcher are gone within 10 s, and status.json says the run was interrupted at round 1 (see _stop)."""
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "federation.rounds=3"]
    mark, folder = uuid.uuid4().hex, tmp_path / "stopped"
    _stop(_start_paused(args, folder, mark), folder, mark, kill_group=False)


def test_a_run_killed_after_round_1_of_3_resumes_and_ends_as_the_uninterrupted_run(capsys, tmp_path, tiny_model_dir):
    """SIGKILL to the launcher's process group (the launcher can clean nothing up): its watchdog stops the run
    within 30 s and marks it interrupted; refused overwrites; the resume's rounds equal the uninterrupted run's."""
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "federation.rounds=3",
            "partition=dirichlet", "partition.alpha=1.0"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    _run_stopped_after_round_1(args, whole, stopped, capsys, kill_group=True)
    capsys.readouterr()
    assert cli.main(["run", *args, f"output_dir={stopped}"]) == 2  # a new run would overwrite it: refused
    assert "holds an unfinished run" in capsys.readouterr().err
    assert cli.main(["resume", str(stopped), "seed=1"]) == 2  # other settings than the checkpoint's: refused
    assert "seed: 0 -> 1" in capsys.readouterr().err

    assert cli.main(["resume", str(stopped)]) == 0, capsys.readouterr().err[-3000:]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["resumed_from_round"] == 1 and result["rounds"] == 3
    assert _trajectory(stopped) == _trajectory(whole)
    assert _rounds_json_but_timings(stopped) == _rounds_json_but_timings(whole)
    status = json.loads((stopped / "status.json").read_text())
    assert (status["state"], status["round"], status["num_rounds"]) == ("completed", 3, 3)
    summaries = [json.loads((f / "summary.json").read_text()) for f in (whole, stopped)]
    assert summaries[0]["final_prompt"] == summaries[1]["final_prompt"]
    assert summaries[0]["queries"] == summaries[1]["queries"]

    assert cli.main(["resume", str(stopped)]) == 0  # finished: its result, and nothing runs or is removed
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert (stopped / "summary.json").is_file()


def test_a_dp_post_run_resumes_with_its_accountants_and_ends_as_the_uninterrupted_run(capsys, tmp_path, tiny_model_dir):
    """POST with DP-SGD: the clients' accountant histories (context.state on disk) survive the stop, so the
    resumed run's epsilon per round and its final soft prompt equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from tests.test_post_fl import post_overrides

    args = [*post_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir, "method.privacy.epsilon=8"),
            "federation.rounds=3"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    _run_stopped_after_round_1(args, whole, stopped, capsys)
    capsys.readouterr()
    assert cli.main(["resume", str(stopped)]) == 0, capsys.readouterr().err[-3000:]

    def epsilons(folder: Path) -> list[float]:
        return [r["client_metrics"]["epsilon-max"] for r in json.loads((folder / "rounds.json").read_text())[1:]]

    assert _trajectory(stopped) == _trajectory(whole)
    assert epsilons(stopped) == epsilons(whole) and epsilons(whole) == sorted(set(epsilons(whole)))  # cumulative
    summaries = [json.loads((f / "summary.json").read_text()) for f in (whole, stopped)]
    assert summaries[0]["epsilon"] == summaries[1]["epsilon"] == epsilons(whole)[-1]
    prompts = [load_file(f / "prompt.safetensors") for f in (whole, stopped)]
    assert prompts[0].keys() == prompts[1].keys()
    assert all((prompts[0][k] == prompts[1][k]).all() for k in prompts[0])


def test_a_rapt_run_resumes_with_its_trainer_and_ends_as_the_uninterrupted_run(capsys, tmp_path, tiny_model_dir):
    """RAPT trains on the server: its pool of privatized examples, head, optimizer and batch sampler are the
    strategy's checkpoint state, so `fedprompt resume` after round 1 of 3 ends with the same soft prompt and rows
    (eval_every=2: round 1 is not scored, rounds 0, 2 and 3 are)."""
    import torch

    from tests.test_rapt_fl import rapt_overrides

    args = [*rapt_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "federation.rounds=3",
            "federation.eval_limit=8", "federation.eval_every=2"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    _run_stopped_after_round_1(args, whole, stopped, capsys)
    capsys.readouterr()
    assert cli.main(["resume", str(stopped)]) == 0, capsys.readouterr().err[-3000:]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["resumed_from_round"] == 1 and result["rounds"] == 3
    assert _trajectory(stopped) == _trajectory(whole)
    assert _rounds_json_but_timings(stopped) == _rounds_json_but_timings(whole)
    assert [r["accuracy"] is None for r in json.loads((whole / "rounds.json").read_text())] == [False, True, False, False]
    assert torch.equal(torch.load(stopped / "soft_prompt.pt"), torch.load(whole / "soft_prompt.pt"))
    summaries = [json.loads((f / "summary.json").read_text()) for f in (whole, stopped)]
    assert summaries[0]["examples_received"] == summaries[1]["examples_received"] > 0
    assert summaries[0]["train_steps"] == summaries[1]["train_steps"] == 3 * 2
