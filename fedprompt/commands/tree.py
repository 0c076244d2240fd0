"""One process tree per run, stopped as one.

A ``fedprompt run`` starts the SuperLink, which starts the SuperExec, which starts flwr-simulation, which
starts Ray (GCS, raylet, dashboard, monitors) and Ray its actors. Neither a process group nor the process
tree holds them all: Flower starts the SuperExec in a session of its own, and a process whose parent dies is
re-parented to init. What they all keep is their parent's environment. So every process of a run carries
``FEDPROMPT_RUN_TOKEN=<token>`` in its environment, and the run's processes are those whose environment
holds its token, found with psutil wherever they are (:func:`run_processes`).

:class:`RunProcesses` gives a run its token and stops every process carrying it when the run is left: done,
failed, Ctrl-C or SIGTERM. If the launcher dies before it can (SIGKILL, the OOM killer), a watchdog does: a
small process in a session of its own (a kill of the launcher's group misses it) that holds the read end of
a pipe whose write end only the launcher holds. The launcher writes ``done`` after stopping the run; a pipe
that closes without it means the launcher died, and the watchdog stops the run's processes and marks the run
folder interrupted (fedprompt.commands.status).

    python -m fedprompt.commands.tree <pipe fd> <token> <run folder>     # the watchdog; started by RunProcesses
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Iterable

import psutil

TOKEN_ENV = "FEDPROMPT_RUN_TOKEN"
GRACE_S = 2.0  # SIGTERM, then this long to exit cleanly, then SIGKILL (all state worth keeping is on disk)
DONE = b"done"
WATCHDOG_LOG = "watchdog.log"


def run_processes(token: str) -> list[psutil.Process]:
    """The live processes (but this one) whose environment holds ``TOKEN_ENV=token``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone (or a zombie), or another user's
            pass
    return found


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a dead process its parent has not reaped yet: a container's init may never)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    # Polls rather than psutil.wait_procs: that waits for zombies too, and reaps our own children under Popen.
    deadline = time.monotonic() + timeout_s
    while (procs := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return procs


def stop_processes(procs: Iterable[psutil.Process], grace_s: float = GRACE_S) -> list[psutil.Process]:
    """SIGTERM all at once (each may shut down cleanly), SIGKILL what is left after ``grace_s``; returns what
    survived even that (nothing, unless a process is stuck in the kernel)."""
    procs = list(procs)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for proc in procs:
            with suppress(psutil.NoSuchProcess):  # psutil also refuses a pid that now names another process
                proc.send_signal(sig)
        procs = _wait(procs, wait_s)
        if not procs:
            break
    return procs


def stop_run(token: str, grace_s: float = GRACE_S) -> int:
    """Stop every process of the run; returns how many there were. Looks again after each sweep: a process
    may start one more while it is stopped (a raylet a worker)."""
    stopped = 0
    for _ in range(5):
        procs = run_processes(token)
        if not procs:
            break
        stop_processes(procs, grace_s)
        stopped += len(procs)
    return stopped


class RunProcesses:
    """``with RunProcesses(folder) as tree:`` start the run's processes with ``tree.env`` in their environment;
    on leaving, every one of them is stopped, and a watchdog stops them if this process dies first."""

    def __init__(self, folder: Path, grace_s: float = GRACE_S) -> None:
        self.folder, self.grace_s = Path(folder), grace_s
        self.token = secrets.token_hex(16)
        self.env = {TOKEN_ENV: self.token}

    def __enter__(self) -> RunProcesses:
        read_fd, self._write_fd = os.pipe()  # both ends non-inheritable: no other child gets the write end
        # The watchdog imports this very fedprompt, wherever the launcher found it (a checkout, an install).
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
        try:
            with (self.folder / WATCHDOG_LOG).open("ab") as log:
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-m", "fedprompt.commands.tree", str(read_fd), self.token, str(self.folder)],
                    pass_fds=(read_fd,), env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)  # out of the launcher's group: `kill -9 -<pgid>` must miss it
        except BaseException:
            os.close(self._write_fd)
            raise
        finally:
            os.close(read_fd)
        return self

    def __exit__(self, *exc) -> None:
        try:
            stop_run(self.token, self.grace_s)
        except BaseException:  # a second Ctrl-C while stopping: no "done", so the watchdog finishes the job
            os.close(self._write_fd)
            raise
        with suppress(OSError):  # a watchdog that died: nothing to tell
            os.write(self._write_fd, DONE)
        os.close(self._write_fd)
        with suppress(subprocess.TimeoutExpired):
            self._watchdog.wait(timeout=10)  # it exits on "done" at once; no zombie left behind


def watch(fd: int, token: str, folder: Path) -> None:
    """The watchdog: wait for the launcher to say it is done or to die; if it died, stop the run and say so."""
    message = b""
    while chunk := os.read(fd, 64):
        message += chunk
    if message == DONE:
        return
    from fedprompt.commands.status import mark_interrupted

    stopped = stop_run(token)
    status = mark_interrupted(folder, "the launcher's death")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} the launcher died without stopping the run: stopped {stopped} "
          f"processes; {status.get('message', '')}", flush=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
