"""Shared pieces of the deployment tests: a local deployment of the tiny run, a run in a background thread
(so a test can break things while it runs), polling with a deadline, a Flower app with faulty clients, and the
faults themselves (a SuperNode killed, the service stopped) with what the tests read of a deployment."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fedprompt.commands.deploy import DeploySettings, LocalDeployment, local_run
from fedprompt.commands.launch import RunOutcome, stop_process_group
from fedprompt.commands.run import app_dir
from fedprompt.config import compose
from tests.fl_support import tiny_overrides, write_secret_task


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 300.0, logs: Path | None = None) -> None:
    """Poll until ``condition`` holds; on timeout fail with the tail of every log under ``logs``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            files = sorted((logs or Path(".")).glob("*.log"))
            tails = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in files)
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s{tails}")
        time.sleep(0.2)


def supernode_log(deployment: LocalDeployment, i: int) -> Path:
    return deployment.folder / f"supernode-{i}.log"


def supernode_id(deployment: LocalDeployment, i: int) -> int | None:
    """SuperNode i's Flower node id, as its log says (the ids in a run's rounds.json and audit)."""
    match = re.search(r"SuperNode ID: (\d+)", supernode_log(deployment, i).read_text(errors="replace"))
    return int(match.group(1)) if match else None


def kill_supernode(deployment: LocalDeployment, i: int) -> None:
    """SIGKILL SuperNode i and its ClientApps at once, as when its host dies: no goodbye to the SuperLink."""
    os.killpg(deployment.supernodes[i].pid, signal.SIGKILL)
    deployment.supernodes[i].wait(timeout=30)


def stop_service(deployment: LocalDeployment) -> None:
    """Stop the deployment's black-box service alone (``deployment.start_service()`` starts it again)."""
    if deployment.service is not None:
        stop_process_group(deployment.service)


@dataclass
class BackgroundRun:
    """``flwr run`` on a deployment, in a thread; ``join`` returns the outcome (or re-raises its error)."""

    deployment: LocalDeployment
    app: Path
    run_config: Path
    folder: Path
    result: list = field(default_factory=list)

    def start(self) -> BackgroundRun:
        def target() -> None:
            try:
                with (self.folder / "flower.log").open("w") as log:
                    self.result.append(self.deployment.run(self.app, self.run_config, log))
            except BaseException as err:  # noqa: BLE001 - handed to join()
                self.result.append(err)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout_s: float = 600.0) -> RunOutcome:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the run did not end within {timeout_s:.0f} s; see {self.folder}"
        if isinstance(self.result[0], BaseException):
            raise self.result[0]
        return self.result[0]

    def rounds(self) -> list[dict]:
        return json.loads((self.folder / "rounds.json").read_text())


@contextmanager
def tiny_deployment(tmp_path: Path, model_dir: Path, clients: int, *overrides: str) -> Iterator[tuple]:
    """The tiny run on a local deployment of ``clients`` SuperNodes; yields (deployment, run folder, run config)."""
    cfg = compose([*tiny_overrides(write_secret_task(tmp_path / "data"), model_dir, clients=clients),
                   f"output_dir={tmp_path / 'run'}", *overrides])
    with local_run(cfg, DeploySettings(startup_timeout_s=240)) as parts:
        yield parts


def background_run(deployment: LocalDeployment, folder: Path, run_config: Path, app: Path | None = None) -> BackgroundRun:
    return BackgroundRun(deployment, app or app_dir(), run_config, folder).start()


FAULTY_CLIENT = '''
"""fedprompt's ClientApp, with FedDTPT's client broken on two partitions (the deployment fault tests)."""
import time

import fedprompt.fl.client_app
import fedprompt.fl.feddtpt as feddtpt_client

app = fedprompt.fl.client_app.app  # the ClientApp Flower loads (an assignment: `flwr run` looks for one)

_train = feddtpt_client.train


def train(msg, context, cfg):
    partition = int(context.node_config["partition-id"])
    if partition == 0:
        raise RuntimeError("injected fault: a secret detail that must not reach the server")
    if partition == 1:
        time.sleep(3600)  # never answers within federation.round_timeout_s
    return _train(msg, context, cfg)


feddtpt_client.train = train  # the method registry looks the client up when a message arrives
'''


def write_client_app(folder: Path, name: str, client_source: str, description: str) -> Path:
    """A Flower app folder: fedprompt's ServerApp and the ClientApp ``app`` of module ``<name>_client``
    (``client_source``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_client.py").write_text(client_source)
    (folder / "pyproject.toml").write_text(f'''[project]
name = "{name}"
version = "1.0.0"
description = "{description}"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "fedprompt.fl.server_app:app"
clientapp = "{name}_client:app"

[tool.flwr.app.config]
fedprompt-config = ""
''')
    return folder


def write_faulty_app(folder: Path) -> Path:
    """A Flower app folder: fedprompt's ServerApp, and a ClientApp whose partition 0 raises and 1 hangs."""
    return write_client_app(folder, "faulty", FAULTY_CLIENT, "fedprompt with faulty clients")
