"""`fedprompt deploy`: certificates, HTTPS to the black box, bad input before anything starts, and a real
deployment on loopback (SuperLink + 3 SuperNodes + `fedprompt serve`, separate processes, TLS everywhere,
SuperNode authentication) that runs 2 FedDTPT rounds and survives a restart of the black-box service."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedprompt import cli
from fedprompt.blackbox import HttpBlackBox, ServiceUnavailable
from fedprompt.blackbox.runner import RunningServer
from fedprompt.blackbox.server import create_app
from fedprompt.blackbox.settings import ServerSettings
from fedprompt.commands import deploy
from fedprompt.commands.launch import _tool, free_port
from fedprompt.commands.run import app_dir
from tests.deploy_support import stop_service, supernode_id, supernode_log, wait_for
from tests.fl_support import find_leaks, tiny_overrides, write_secret_task

SCRIPT = app_dir() / "scripts" / "make-certs.sh"


def make_certs(folder: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **({"PATH": path} if path else {})}
    return subprocess.run(["bash", str(SCRIPT), str(folder), *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs") / "certs"
    assert make_certs(folder, "--supernodes", "1").returncode == 0
    return folder


def test_make_certs_signs_servers_and_makes_keys_flower_reads(certs):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    for name in ("superlink", "service", "runtime"):
        check = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / f"{name}.crt")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        text = subprocess.run(["openssl", "x509", "-in", str(certs / f"{name}.crt"), "-noout", "-text"],
                              capture_output=True, text=True).stdout
        assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    load_ssh_private_key((certs / "supernode-0").read_bytes(), None)  # as flower-supernode reads it
    load_ssh_public_key((certs / "supernode-0.pub").read_bytes())  # as `flwr supernode register` reads it
    assert oct((certs / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_make_certs_keeps_what_exists_and_adds_keys_without_ssh_keygen(certs, tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    before = (certs / "ca.crt").read_bytes()
    bin_dir = tmp_path / "bin"  # a PATH with openssl and the shell's basics, but no ssh-keygen
    bin_dir.mkdir()
    for tool in ("bash", "openssl", "mkdir", "chmod", "rm", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    out = make_certs(certs, "--supernodes", "2", "--superlink-san", "DNS:link.example.org", path=str(bin_dir))
    assert out.returncode == 0, out.stderr
    assert (certs / "ca.crt").read_bytes() == before  # the CA (and what it signed) is kept
    load_ssh_private_key((certs / "supernode-1").read_bytes(), None)
    assert make_certs(certs, "--supernodes", "x").returncode == 2


def test_the_http_client_verifies_the_service_against_the_private_ca(certs, tiny_model_dir):
    from fedprompt.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))
    app = create_app(model, ServerSettings(model_id="tiny", api_keys_env="FEDPROMPT_TEST_NO_KEYS"), tokenizer=tokenizer)
    with RunningServer(app, ssl_certfile=str(certs / "service.crt"), ssl_keyfile=str(certs / "service.key")) as server:
        assert server.url.startswith("https://")
        with HttpBlackBox(server.url, ca_file=str(certs / "ca.crt"), retries=0) as client:
            result = client.classify(["a great movie"], [" p", " ne"])
        assert np.isfinite(result.logprobs).all()
        with HttpBlackBox(server.url, retries=0) as client, pytest.raises(ServiceUnavailable, match="CERTIFICATE"):
            client.classify(["a great movie"], [" p", " ne"])  # the system's trust store does not know our CA


@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process started before the input was validated")

    monkeypatch.setattr(deploy.LocalDeployment, "__enter__", refuse)
    monkeypatch.setattr(deploy, "submit_run", refuse)


@pytest.mark.parametrize("args, message", [
    (["deploy.superlink_port=70000"], "deploy.superlink_port must be a port"),
    (["deploy.startup_timeout_s=0"], "deploy.startup_timeout_s must be > 0"),
    (["+deploy.tls=false"], "unknown config key 'deploy.tls': the deploy node takes ["),
    (["federation.min_replies=3"], "federation.min_replies=3 but a round samples only 2 clients"),
    (["federation.min_available_clients=3"], "federation.min_available_clients must be in 1..num_clients=2"),
    (["service.kind=http", "service.client.ca_file=/no/such/ca.crt"], "service.client.ca_file"),
    (["service.kind=http", "service.api_keys_file=/no/such/keys"], "service.api_keys_file '/no/such/keys' does not exist"),
    (["deploy.connection=prod", "service.api_key=sk-3c1e"], "service.api_key does not reach a remote deployment"),
])
def test_bad_input_is_one_line_before_anything_starts(capsys, tmp_path, tiny_model_dir, nothing_starts, args, message):
    code = cli.main(["deploy", *tiny_overrides(write_secret_task(tmp_path), tiny_model_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "sk-3c1e" not in err


def test_serve_needs_both_tls_files(capsys):
    assert cli.main(["serve", "service.tls.certfile=/no/such.crt"]) == 2
    assert "service.tls needs both certfile and keyfile" in capsys.readouterr().err


class CapturedDeployment(deploy.LocalDeployment):
    """The CLI's LocalDeployment, handed to the test while the run goes on."""

    running: list = []

    def __enter__(self):
        deployment = super().__enter__()
        CapturedDeployment.running.append(deployment)
        return deployment


@pytest.mark.deploy
@pytest.mark.timeout(900)
def test_fedprompt_deploy_runs_two_rounds_on_three_supernodes_over_tls_through_a_service_restart(
        capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(deploy, "LocalDeployment", CapturedDeployment)
    CapturedDeployment.running.clear()
    out = tmp_path / "run"
    args = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir, clients=3), "federation.rounds=2",
            "service.kind=http", "service.client.retries=60", "service.client.backoff_s=0.2",
            "service.client.max_backoff_s=1", "federation.audit_replies=true", f"output_dir={out}",
            # Round 0 then scores only the 8 evaluation texts (no references): the service stops between that
            # evaluation and the clients' first query, as the test intends, whatever the machine's speed.
            "federation.eval_references=false"]
    codes: list[int] = []
    command = threading.Thread(target=lambda: codes.append(cli.main(["deploy", *args])), daemon=True)
    command.start()
    logs = out / "deploy"
    wait_for(lambda: bool(CapturedDeployment.running) or not command.is_alive(), "the deployment", logs=logs)
    assert CapturedDeployment.running, capsys.readouterr().err[-3000:]
    deployment = CapturedDeployment.running[0]
    ca = ssl.create_default_context(cafile=str(deployment.certs.ca))

    def served() -> int:
        return httpx.get(deployment.service_url + "/health", verify=ca, timeout=5).json()["texts_scored"]

    # The black-box service goes down after the server's round-0 evaluation (8 texts), before the clients'
    # first query, and comes back on the same port once a client is seen retrying.
    wait_for(lambda: served() >= 8, "the server's round-0 evaluation", logs=logs)
    stop_service(deployment)
    wait_for(lambda: any("retry 1 of 60" in supernode_log(deployment, i).read_text(errors="replace") for i in range(3)),
             "a client retrying the service", logs=logs)
    deployment.start_service()
    _tls_and_supernode_auth_are_enforced(deployment)  # while the run goes on
    command.join(600)
    assert not command.is_alive(), "fedprompt deploy did not return"

    stdout, stderr = capsys.readouterr()
    assert codes == [0], stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["rounds"] == 2 and result["num_clients"] == 3 and result["service"] == "http"
    assert result["client_replies"] == 6 and result["failures"] == 0 and result["skipped_rounds"] == []
    rows = json.loads((out / "rounds.json").read_text())
    assert [(r["round"], r["clients_sampled"], r["replies"]) for r in rows] == [(0, 0, 0), (1, 3, 3), (2, 3, 3)]
    for name in ("summary.json", "rounds.csv", "accuracy.png", "config.yaml", "partition.json", "flower.log"):
        assert (out / name).is_file(), name
    # Every SuperNode answered with its own partition: three nodes, each one reply a round.
    audit = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert sorted({row["node"] for row in audit}) == sorted(supernode_id(deployment, i) for i in range(3))
    assert all(find_leaks(base64.b64decode(row["content"])) == [] for row in audit)
    # Every hop was TLS: the SuperLink's APIs, each SuperNode's Runtime API, the black-box service.
    for log in ("superlink", "supernode-0", "supernode-1", "supernode-2", "service"):
        assert "https://127.0.0.1:" in (logs / f"{log}.log").read_text(errors="replace"), log
    # Everything was torn down.
    host, port = deployment.superlink_address.split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()
    assert all(p.poll() is not None for p in (*deployment.supernodes, deployment.superlink, deployment.service))


def _tls_and_supernode_auth_are_enforced(deployment) -> None:
    host, port = deployment.superlink_address.split(":")
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the SuperLink's port
        httpx.get(f"http://{host}:{port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a private CA, not a public one
        httpx.get(f"https://{host}:{port}/health", timeout=5)
    # A SuperNode whose key was never registered (`flwr supernode register`) is turned away.
    assert make_certs(deployment.certs.folder, "--supernodes", "4").returncode == 0
    intruder = subprocess.run(
        [_tool("flower-supernode"), "--superlink", deployment.superlink_address, "--root-certificates",
         str(deployment.certs.ca), "--auth-supernode-private-key", str(deployment.certs.supernode_key(3)),
         "--max-retries", "0", "--isolation", "process", "--port", str(free_port()),
         "--node-config", "partition-id=0 num-partitions=3"],
        env=deployment.env, capture_output=True, text=True, timeout=120)
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in intruder.stdout + intruder.stderr
    assert deployment.online() == 3
