"""``fedprompt deploy``: the same ServerApp / ClientApp on a Flower deployment instead of a simulation.

With ``deploy.connection=<name>`` the run is submitted to a running SuperLink named in
``$FLWR_HOME/config.toml`` (real machines, docs/deployment.md). Without it, a whole deployment is brought up
on this machine's loopback, every piece its own process group as it would be its own host, then the run is
submitted, its results collected and everything torn down (:class:`LocalDeployment`)::

    scripts/make-certs.sh CERTS --supernodes N               private CA, server certificates, SuperNode keys
    python -m fedprompt.blackbox.cli_serve service.yaml       `fedprompt serve` over HTTPS (service.kind=http)
    flower-superlink --ssl-ca-certfile .. --ssl-certfile .. --ssl-keyfile .. --enable-supernode-auth
    flwr supernode register CERTS/supernode-i.pub fedprompt  (i < N: only registered keys may connect)
    fedprompt partition ... output_dir=<run folder>/deploy/data   one folder of rows per SuperNode
    flower-supernode --superlink 127.0.0.1:P --root-certificates CERTS/ca.crt
        --auth-supernode-private-key CERTS/supernode-i
        --node-config 'partition-id=i num-partitions=N data-dir="<run folder>/deploy/data/partition_i"'
        --port Q --ssl-certfile .. --ssl-keyfile .. --ssl-ca-certfile ..   (its Runtime API, also over TLS)
    flwr run <app> fedprompt --run-config run_config.toml --stream
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from omegaconf import DictConfig, OmegaConf

from fedprompt.commands.launch import CONNECTION, QUIET_ENV, RunOutcome, _tool, free_port, stop_process_group, submit_run
from fedprompt.errors import ConfigError, FedPromptError
from fedprompt.sections import DeploySettings  # noqa: F401  (re-exported)


class DeploymentError(FedPromptError):
    """A piece of the local deployment did not come up (its log says why)."""


@dataclass(frozen=True)
class Certificates:
    """The files of ``scripts/make-certs.sh`` (see there for who keeps which)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def server(self, name: str) -> tuple[Path, Path]:
        """Certificate and key of ``superlink``, ``service`` or ``runtime``."""
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"

    def supernode_key(self, i: int, public: bool = False) -> Path:
        return self.folder / f"supernode-{i}{'.pub' if public else ''}"

    def make(self, supernodes: int) -> None:
        """Run the script: what exists is kept, what is missing is made."""
        from fedprompt.commands.run import app_dir

        script = app_dir() / "scripts" / "make-certs.sh"
        out = subprocess.run(["bash", str(script), str(self.folder), "--supernodes", str(supernodes)],
                             capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
        if out.returncode != 0:
            raise DeploymentError(f"{script} failed: {(out.stderr or out.stdout).strip()[-500:]}")


def _own_service(cfg: DictConfig) -> bool:
    """service.kind=http without a service.url: the local deployment runs the service itself."""
    return cfg.service.kind == "http" and not cfg.service.get("url")


def _https_ok(url: str, ca: Path) -> bool:
    import httpx

    try:
        return httpx.get(url, verify=ssl.create_default_context(cafile=str(ca)), timeout=2.0).is_success
    except httpx.HTTPError:
        return False


def _wait(ready: Callable[[], bool], what: str, procs: list[subprocess.Popen], log: Path, timeout_s: float) -> None:
    """Poll ``ready`` until it holds; fail early, naming the log, when one of ``procs`` has exited."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if any(proc.poll() is not None for proc in procs):
            raise DeploymentError(f"{what}: a process exited (codes {[p.poll() for p in procs]}); see {log}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"{what} was not up after {timeout_s:.0f} s; see {log}")
        time.sleep(0.5)


class LocalDeployment:
    """SuperLink, N SuperNodes and (for service.kind=http without service.url) the black-box service on
    127.0.0.1, all over TLS, with SuperNode authentication; a context manager that stops them all.

    Each SuperNode gets its own data, as an organisation's host would have it: the run's partitions are written
    to ``deploy/data/partition_<i>`` (fedprompt.runs.node_data) and SuperNode i's node config names only its own
    folder (``data-dir``), so its ClientApps never open the task's training split or another partition."""

    def __init__(self, cfg: DictConfig, folder: Path, settings: DeploySettings) -> None:
        self.cfg, self.settings = cfg, settings
        self.folder = Path(folder).resolve() / "deploy"
        self.data_folder = self.folder / "data"
        self.num_supernodes = int(cfg.federation.num_clients)
        self.certs = Certificates(Path(settings.certs_dir).expanduser().resolve() if settings.certs_dir
                                  else self.folder / "certs")
        self.superlink_address = f"127.0.0.1:{settings.superlink_port or free_port()}"
        self.own_service = _own_service(cfg)
        self.service_port = (settings.service_port or free_port()) if self.own_service else None
        self.service_url = f"https://127.0.0.1:{self.service_port}" if self.own_service else None
        # The SuperLink starts `flower-superexec` by name: this interpreter's scripts come first on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **QUIET_ENV, "PATH": path}
        # The flwr CLI (register, ls, run) gets its own FLWR_HOME with the connection to our SuperLink.
        self.service_env: dict[str, str] = {}
        if self.own_service:  # before env_cli, so that the flwr CLI hands the same environment to the apps
            self.env, self.service_env = service_key_env(cfg, self.env)
        self.env_cli = {**self.env, "FLWR_HOME": str(self.folder / "flwr-cli")}
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.service: subprocess.Popen | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.certs.make(self.num_supernodes)
            self.write_node_data()
            if self.own_service:
                self.start_service()
            self._start_superlink()
            for i in range(self.num_supernodes):
                self._flwr("supernode", "register", str(self.certs.supernode_key(i, public=True)), CONNECTION)
            self.supernodes = [self._start_supernode(i) for i in range(self.num_supernodes)]
            _wait(lambda: self.online() == self.num_supernodes, f"{self.num_supernodes} SuperNodes online",
                  self.supernodes, self.folder, self.settings.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        procs = [p for p in (*self.supernodes, self.superlink, self.service) if p is not None and p.poll() is None]
        for proc in procs:  # all at once: each shuts down (and deregisters) in parallel
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            stop_process_group(proc)  # waits, and kills what is left

    def _spawn(self, name: str, command: list[str], home: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        """A process in its own session (its own process group, as on its own host), logging to <name>.log."""
        cwd = home or self.folder
        cwd.mkdir(parents=True, exist_ok=True)
        env = env or self.env
        env = {**env, "FLWR_HOME": str(home)} if home else env
        with (self.folder / f"{name}.log").open("ab") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    # ---- the pieces -------------------------------------------------------------------------------

    def start_service(self) -> None:
        """``fedprompt serve`` over HTTPS on 127.0.0.1 with the run's whole config."""
        cert, key = self.certs.server("service")
        cfg = OmegaConf.merge(self.cfg, {"service": {"host": "127.0.0.1", "port": self.service_port,
                                                     "tls": {"certfile": str(cert), "keyfile": str(key)}}})
        config = self.folder / "service.yaml"
        config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.service = self._spawn("service", [sys.executable, "-m", "fedprompt.blackbox.cli_serve", str(config)],
                                   env={**self.env, **self.service_env})
        url = self.service_url
        assert url is not None  # start_service runs only for a service of the deployment's own (own_service)
        _wait(lambda: _https_ok(url + "/health", self.certs.ca), "the black-box service",
              [self.service], self.folder / "service.log", self.settings.startup_timeout_s)

    def _start_superlink(self) -> None:
        host, port = self.superlink_address.split(":")
        cert, key = self.certs.server("superlink")
        self.superlink = self._spawn("superlink", [
            _tool("flower-superlink"), "--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--enable-supernode-auth", "--isolation", "subprocess",
            "--host", host, "--port", port, "--database", ":flwr-in-memory:",
            "--disable-runtime-dependency-installation"], home=self.folder / "superlink")
        cli_home = Path(self.env_cli["FLWR_HOME"])  # the flwr CLI's connection to it: TLS against our CA
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.superlink_address}"\nroot-certificates = "{self.certs.ca}"\n')
        _wait(lambda: _https_ok(f"https://{self.superlink_address}/health", self.certs.ca), "the SuperLink",
              [self.superlink], self.folder / "superlink.log", self.settings.startup_timeout_s)

    def write_node_data(self) -> None:
        """The run's partitions, one folder per SuperNode (a previous deployment's copy in this folder is replaced)."""
        from fedprompt.commands.partition import remove_partitions, write_partitions

        remove_partitions(self.data_folder)
        write_partitions(self.cfg, self.data_folder)

    def node_data_dir(self, i: int) -> Path:
        """SuperNode i's own data folder (its node config's ``data-dir``)."""
        from fedprompt.runs.node_data import partition_folder

        return partition_folder(self.data_folder, i)

    def _start_supernode(self, i: int) -> subprocess.Popen:
        from fedprompt.runs.node_data import node_config_line

        cert, key = self.certs.server("runtime")
        return self._spawn(f"supernode-{i}", [
            _tool("flower-supernode"), "--superlink", self.superlink_address, "--root-certificates", str(self.certs.ca),
            "--auth-supernode-private-key", str(self.certs.supernode_key(i)),
            "--node-config", node_config_line(i, self.num_supernodes, self.node_data_dir(i)), "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(free_port()),  # its Runtime API, for its own ClientApp processes
            "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(self.certs.ca),
        ], home=self.folder / f"supernode-{i}")

    def _flwr(self, *args: str) -> dict:
        out = subprocess.run([_tool("flwr"), *args, "--format", "json"], env=self.env_cli, capture_output=True,
                             text=True, timeout=120)
        try:
            body = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            body = {"success": False}
        if not body.get("success", False):
            raise DeploymentError(f"`flwr {' '.join(args)}` failed: {(out.stdout + out.stderr).strip()[-500:]}")
        return body

    def online(self) -> int:
        """SuperNodes the SuperLink currently counts as online."""
        return sum(n.get("status") == "online" for n in self._flwr("supernode", "ls", CONNECTION).get("nodes", []))

    # ---- what the run uses --------------------------------------------------------------------------

    def client_config(self, cfg: DictConfig) -> DictConfig:
        """The run's config, pointed at the deployment's own service (https, our CA) when it runs one."""
        if not self.own_service:
            return cfg
        from fedprompt.config import merge

        return merge(cfg, {"service": {"url": self.service_url, "client": {"ca_file": str(self.certs.ca)}}})

    def run(self, app: Path, run_config: Path, log: TextIO, echo: TextIO | None = None) -> RunOutcome:
        return submit_run(app, CONNECTION, run_config, self.env_cli, log, echo)


def service_key_env(cfg: DictConfig, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The local service's API key: the run's own (``service.api_key``, already moved to $FEDPROMPT_API_KEY by
    :func:`fedprompt.redact.redact_config`) or a fresh random one. Returns (every process's environment, with
    the key the clients send; the extra environment of the service, which accepts it).

    Only environments carry the key: the service's config file, the run folder and the logs never do, and
    the key dies with the deployment. The service also keeps the keys of ``service.api_keys_file``."""
    from fedprompt.blackbox.accounting import parse_keys_file
    from fedprompt.redact import SECRETS

    client_var, server_var = SECRETS["service.api_key"], str(cfg.service.get("api_keys_env") or "FEDPROMPT_API_KEYS")
    key = env.get(client_var) if cfg.service.get("api_key") is not None else None
    key = key or secrets.token_urlsafe(32)
    keys_file = cfg.service.get("api_keys_file")
    listed = {spec.key for spec in parse_keys_file(keys_file)} if keys_file else set()
    served = env.get(server_var, "").replace(",", " ").split()
    if key not in listed and key not in served:  # listed twice is refused by the service
        served.append(key)
    return {**env, client_var: key}, {server_var: " ".join(served)}


@contextmanager
def local_run(cfg: DictConfig, settings: DeploySettings) -> Iterator[tuple[LocalDeployment, Path, Path]]:
    """The run's checks, then the local deployment and the run folder: yields (deployment, folder, run config)."""
    from fedprompt.commands.run import prepare, start_run_folder
    from fedprompt.config import merge
    from fedprompt.runs.report import run_folder

    if _own_service(cfg):  # not up yet: check its settings, and its model and label words as in-process would
        from fedprompt.blackbox.settings import ServerSettings

        ServerSettings.from_config(cfg)
    partition = prepare(merge(cfg, {"service": {"kind": "inprocess"}}) if _own_service(cfg) else cfg)
    with LocalDeployment(cfg, run_folder(cfg), settings) as deployment:
        cfg, folder, run_config, _ = start_run_folder(deployment.client_config(cfg), partition)
        yield deployment, folder, run_config


def check_secret_noise(cfg: DictConfig) -> None:
    """Refuse (one line, before anything starts) DP noise the server could replay: ``method.privacy.noise_seed=
    simulation`` seeds it from (seed, round, partition-id), all known to the server. Refused rather than switched
    to ``secure`` behind the user's back, so that the run's config.yaml says which noise was used."""
    from fedprompt.privacy.dp import PrivacyConfig
    from fedprompt.runs.run_config import method_config

    privacy = getattr(method_config(cfg), "privacy", None)
    if isinstance(privacy, PrivacyConfig) and privacy.enabled and privacy.noise_seed != "secure":
        raise ConfigError(f"fedprompt deploy: method.privacy.noise_seed={privacy.noise_seed} seeds the DP noise from "
                          "(seed, round, partition-id), which the server knows and can replay; deploy with "
                          "method.privacy.noise_seed=secure")


def cmd_deploy(cfg: DictConfig) -> dict:
    from fedprompt.commands.run import app_dir, finish_run, prepare, start_run_folder
    from fedprompt.redact import SECRETS, redact_config
    from fedprompt.runs.protocol import git_state

    start = time.perf_counter()
    check_secret_noise(cfg)
    settings = DeploySettings.from_config(cfg)
    if settings.connection and cfg.service.get("api_key") is not None:
        raise ConfigError(f"service.api_key does not reach a remote deployment's apps (a key is never written into "
                          f"Flower's run config); export {SECRETS['service.api_key']} on the SuperLink's and each "
                          f"SuperNode's host instead, and drop service.api_key")
    cfg = redact_config(cfg)  # before the local service's config file is written
    root = app_dir()
    code = git_state()
    echo = sys.stderr if cfg.get("progress", True) else None
    if settings.connection:  # a SuperLink someone runs: only submit (from its host, where the results land)
        cfg, folder, run_config, _ = start_run_folder(cfg, prepare(cfg))
        with (folder / "flower.log").open("w", buffering=1) as log:
            outcome = submit_run(root, settings.connection, run_config, {**os.environ, **QUIET_ENV}, log, echo)
        return finish_run(folder, outcome, start, code=code)
    with local_run(cfg, settings) as (deployment, folder, run_config), \
            (folder / "flower.log").open("w", buffering=1) as log:
        outcome = deployment.run(root, run_config, log, echo)
    return {**finish_run(folder, outcome, start, code=code), "deployment": str(deployment.folder)}
