"""Start a Flower simulation with ``flwr run`` against a private local SuperLink, and wait for it.

Flower 1.41 runs a simulation through a SuperLink in simulation mode: ``flwr run`` packs the app folder
into a FAB, submits it over the SuperLink's Control API, and the SuperLink runs the ServerApp and the
simulated SuperNodes (Ray). Flower's own ``:local:`` connection starts a shared, detached SuperLink on
fixed ports that outlives the run and keeps the environment of whoever started it first. So each
``fedprompt run`` starts its own SuperLink on a free loopback port, with its own ``FLWR_HOME`` and this
process's environment, and stops it afterwards:

    flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1 --port P
        --database :flwr-in-memory:
    flwr run <app dir> fedprompt --run-config <run folder>/run_config.toml
        --federation-config "num-supernodes=N client-resources-num-cpus=C client-resources-num-gpus=G" --stream

``--stream`` returns when the run has ended but exits 0 even when it failed, so the run's status is read
back with ``flwr ls fedprompt --run-id <id> --format json``.

The SuperLink's environment carries ``extra_env``: ``fedprompt run`` puts its run's token there, so that every
process the SuperLink starts, wherever Flower and Ray put it, is stopped with the run (fedprompt.commands.tree).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence, TextIO

import psutil

from fedprompt.commands.tree import GRACE_S, stop_processes
from fedprompt.errors import FedPromptError

CONNECTION = "fedprompt"
# Offline and quiet: no telemetry, no update check, no runtime pip installs, no Ray usage stats.
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class SimulationError(FedPromptError):
    """The Flower run could not start, or ended in another state than completed."""


@dataclass
class RunOutcome:
    run_id: int
    status: str
    details: str
    elapsed_s: float


def _tool(name: str) -> str:
    # The console scripts of the interpreter running fedprompt (the venv's), else PATH.
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"`{name}` not found next to {sys.executable} or on PATH; install flwr[simulation]")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


@contextmanager
def local_superlink(log_path: Path, cwd: Path, port: int = 0, startup_s: float = 60.0,
                    extra_env: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A SuperLink of our own, with ``extra_env`` in its environment; yields the environment that ``flwr``
    commands need to reach it. On leaving, the SuperLink and everything it started are stopped."""
    home = Path(tempfile.mkdtemp(prefix="fedprompt-flwr-"))
    port = port or free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # The SuperLink starts `flower-superexec` (and that the app processes) by name from PATH: put this
    # interpreter's scripts first, so an un-activated venv (`.venv/bin/fedprompt ...`) finds its own.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **QUIET_ENV, **(extra_env or {}), "FLWR_HOME": str(home), "PATH": path}
    command = [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:"]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SimulationError(f"the local Flower SuperLink did not start on 127.0.0.1:{port} "
                                      f"(exit code {proc.poll()}); see {log_path}")
            time.sleep(0.2)
        yield env
    finally:
        stop_process_group(proc, grace_s=GRACE_S)  # the run is over or stopped: its state is on disk
        shutil.rmtree(home, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop a process started with ``start_new_session=True``, its process group and all its descendants.

    The group alone is not enough: Flower starts the SuperExec (and with it flwr-simulation and Ray) in a
    session of its own, and these outlive a SuperLink that exits (they were seen running for minutes). So
    the descendants are listed while the tree is still whole, and all of them are stopped at once: SIGTERM,
    ``grace_s`` to exit cleanly, then SIGKILL.
    """
    if proc.poll() is not None:
        return
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    stop_processes(family, grace_s)  # one SIGTERM each: Flower takes a second one as "exit now"
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # members of the group that are no descendant (orphans), if any
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)  # reap it


# What the console shows of Flower's stream unless verbose=true: the server's line per round and errors; the
# rest (every actor's model-loading bars, library warnings) stays in flower.log.
CONSOLE_LINES = re.compile(r"\bround \d+: |ERROR|Traceback|Error:")


def flwr_run(app_dir: Path, run_config: Path, num_supernodes: int, client_cpus: int, client_gpus: float,
             env: dict[str, str], log: TextIO, echo: TextIO | None = None, echo_all: bool = True) -> RunOutcome:
    """Submit the app, stream its log to ``log`` (and to ``echo``: all of it, or only CONSOLE_LINES), and
    return how the run ended."""
    federation = (f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={int(client_cpus)} "
                  f"client-resources-num-gpus={float(client_gpus)}")
    return submit_run(app_dir, CONNECTION, run_config, env, log, echo, ["--federation-config", federation], echo_all)


def submit_run(app_dir: Path, connection: str, run_config: Path, env: dict[str, str], log: TextIO,
               echo: TextIO | None = None, extra_args: Sequence[str] = (), echo_all: bool = True) -> RunOutcome:
    """``flwr run <app> <connection> --run-config ... --stream``, then the run's status from ``flwr ls``."""
    command = [_tool("flwr"), "run", str(app_dir), connection, "--run-config", str(run_config), *extra_args, "--stream"]
    log.write("$ " + " ".join(command) + "\n")
    start = time.perf_counter()
    run_id = None
    with subprocess.Popen(command, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        try:
            for line in proc.stdout:
                log.write(line)
                if echo is not None and (echo_all or CONSOLE_LINES.search(line)):
                    echo.write(line)
                if run_id is None and (match := re.search(r"Successfully started run (\d+)", line)):
                    run_id = int(match.group(1))
        except BaseException:  # Ctrl-C / kill: stop streaming too, the SuperLink is stopped next
            proc.terminate()
            raise
    elapsed = time.perf_counter() - start
    if run_id is None:
        raise SimulationError(f"`flwr run` did not start a run (exit code {proc.returncode}); see {log.name}")
    status, details = run_status(run_id, env, connection)
    return RunOutcome(run_id, status, details, elapsed)


def run_status(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> tuple[str, str]:
    out = subprocess.run([_tool("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120)
    try:
        run = json.loads(out.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr).strip()[-500:]
