"""One process tree per run, stopped as one (fedprompt.commands.tree), without Flower: stand-in processes that do what
Flower and Ray do (a session of their own, a parent that exits, SIGTERM ignored) are all stopped when the run is
left, and by the watchdog when the launcher is killed; then status.json says where the run was interrupted.
A real `fedprompt run` stopped both ways: tests/test_resume.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from fedprompt.commands.status import read_status
from fedprompt.commands.tree import RunProcesses, run_processes
from tests.fl_support import MARK_ENV, marked_processes, wait_until_gone

REPO = Path(__file__).resolve().parents[1]
# A stand-in for the SuperExec: ignores SIGTERM (only SIGKILL stops it) and starts a stand-in for
# flwr-simulation in a session of its own, which outlives it as an orphan of init.
SPAWNER = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
           "print('ready', flush=True); time.sleep(600)")


def _spawn(env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SPAWNER], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_leaving_the_run_stops_every_process_with_its_token_and_nothing_else(tmp_path):
    mark = uuid.uuid4().hex
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # no token: not the run's
    try:
        with RunProcesses(tmp_path) as tree:
            spawner = _spawn({**os.environ, **tree.env, MARK_ENV: mark})
            assert len(run_processes(tree.token)) == 2 == len(marked_processes(mark))
        assert spawner.wait(timeout=1) == -signal.SIGKILL  # SIGTERM was ignored: killed after the grace period
        assert not marked_processes(mark) and not run_processes(tree.token)
        assert tree._watchdog.poll() == 0  # told "done": gone too, and it marked nothing
        assert read_status(tmp_path) is None
        assert bystander.poll() is None
    finally:
        bystander.kill()


LAUNCHER = """
import json, os, sys, time
from pathlib import Path
from fedprompt.commands.status import write_status
from fedprompt.commands.tree import RunProcesses
from tests.test_process_tree import _spawn
folder = Path(sys.argv[1])
write_status(folder, "running", pid=os.getpid())
(folder / "checkpoint.json").write_text(json.dumps({"round": 2, "num_rounds": 5}))
with RunProcesses(folder) as tree:
    _spawn({**os.environ, **tree.env})
    print("ready", flush=True)
    time.sleep(600)
"""


def test_the_watchdog_stops_the_run_and_marks_it_interrupted_when_the_launcher_group_is_killed(tmp_path):
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK_ENV: mark, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        assert len(marked_processes(mark)) == 4  # the launcher, its watchdog, the spawner and its child
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's whole group; the watchdog has a session of its own
    launcher.wait()
    wait_until_gone(mark, within_s=10)
    status = read_status(tmp_path)
    assert status["state"] == "interrupted" and (status["round"], status["num_rounds"]) == (2, 5)
    assert status["message"].startswith("interrupted at round 2 of 5 by the launcher's death;")
    assert "stopped 2 processes" in (tmp_path / "watchdog.log").read_text()
