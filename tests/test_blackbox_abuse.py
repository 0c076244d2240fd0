"""The service against hostile and careless clients: the key before the body, body and head time limits, a
connection cap, work stopped when its caller gives up, echo and log-prob memory bounds, shutdown with the model
busy, and the generated key of `fedprompt deploy`'s own service. Each bad request gets a 4xx (or 503 where the
server is the one giving up) and the server keeps serving."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedprompt.blackbox import Limits
from fedprompt.blackbox.engine import ECHO_BYTES_PER_LOGIT
from fedprompt.blackbox.runner import free_port
from fedprompt.models import load_causal_lm, load_tokenizer
from tests.blackbox_support import TEXTS, auth, serving, write_keys

SINGLE = [" p", " ne"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return write_keys(tmp_path_factory.mktemp("keys"))


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].split(":")
    return host, int(port)


def _read_all(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """What the server sends until it closes the connection (or ``timeout_s`` passes)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _head(path: str = "/v1/classify", length: int | None = None, key: str | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if key:
        lines.append(f"Authorization: {auth(key)['Authorization']}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SlowModel:
    """A forward pre-hook that makes each forward pass take ``delay_s`` and counts them."""

    def __init__(self, model, delay_s: float) -> None:
        self.calls, self.delay_s = 0, delay_s
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1
        time.sleep(self.delay_s)

    def settled(self, quiet_s: float = 0.5) -> int:
        """The call count once no forward pass has started for ``quiet_s``."""
        while True:
            before = self.calls
            time.sleep(quiet_s)
            if self.calls == before:
                return before

    def remove(self) -> None:
        self._handle.remove()


@contextmanager
def slow(model, delay_s: float):
    hook = SlowModel(model, delay_s)
    try:
        yield hook
    finally:
        hook.remove()


# ---- the key before the body; body and head limits ------------------------------------------------------

def test_a_stranger_gets_401_before_sending_a_byte_of_the_body(tiny, keys):
    with serving(*tiny, keys) as server:
        for key_header in (b"", b"Authorization: Bearer wrong\r\n"):
            with socket.create_connection(_address(server.url)) as sock:
                # 4 MB announced, none sent: the answer cannot have waited for the body
                sock.sendall(_head(length=4_000_000).replace(b"\r\n\r\n", b"\r\n" + key_header + b"\r\n"))
                start = time.monotonic()
                answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
            assert b"www-authenticate: bearer" in answer.lower()
            assert time.monotonic() - start < 2
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_body_over_the_cap_is_refused_while_it_streams(tiny, keys):
    with serving(*tiny, keys, Limits(max_request_bytes=20_000)) as server:
        with socket.create_connection(_address(server.url)) as sock:  # chunked: no length to check up front
            sock.sendall(_head(key="alice", chunked=True))
            for _ in range(3):  # 24 KiB of a body that would go on
                sock.sendall(b"2000\r\n" + b"a" * 0x2000 + b"\r\n")
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 413") and b"max_request_bytes" in answer, answer[:300]
        with socket.create_connection(_address(server.url)) as sock:  # declared too long: refused before reading
            sock.sendall(_head(length=10_000_000, key="alice"))
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        usage = httpx.get(server.url + "/v1/usage", headers=auth("alice")).json()["usage"]
        assert usage["rejected"] == 2 and usage["requests"] == 0


def test_a_slow_body_gets_408_and_slow_headers_are_cut_off(tiny, keys):
    with serving(*tiny, keys, Limits(body_timeout_s=0.5, header_timeout_s=0.5)) as server:
        with socket.create_connection(_address(server.url)) as sock:
            sock.sendall(_head(length=100, key="alice") + b'{"texts": ')  # 10 of 100 bytes, then nothing
            start = time.monotonic()
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer, answer[:300]
        assert time.monotonic() - start < 3

        slowloris = [socket.create_connection(_address(server.url)) for _ in range(20)]
        start = time.monotonic()
        for sock in slowloris:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        answers = [_read_all(sock) for sock in slowloris]
        elapsed = time.monotonic() - start
        for sock in slowloris:
            sock.close()
        assert all(a.startswith(b"HTTP/1.1 408") and b"header_timeout_s" in a for a in answers), answers[0][:300]
        assert elapsed < 5
        # a keep-alive connection gets the same limit for its next request's head
        with socket.create_connection(_address(server.url)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n")
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer
        assert httpx.get(server.url + "/health").status_code == 200


def test_connections_over_the_cap_get_429_and_the_server_keeps_serving(tiny, keys):
    with serving(*tiny, keys, Limits(max_connections=2, header_timeout_s=5)) as server:
        held = [socket.create_connection(_address(server.url)) for _ in range(2)]
        time.sleep(0.2)  # accepted
        response = httpx.get(server.url + "/v1/models", headers=auth("alice"))
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert "max_connections" in response.json()["error"]["message"]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(server.url + "/v1/models", headers=auth("alice")).status_code == 200


# ---- work that outlives its caller is stopped -----------------------------------------------------------

def test_a_timed_out_request_stops_the_model_between_batches_and_is_not_charged(tiny, keys):
    model = tiny[0]
    with serving(*tiny, keys, Limits(request_timeout_s=0.3), batch_size=1) as server, slow(model, 0.1) as hook:
        texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 2)]  # 16 forward passes: 1.6 s of work
        response = httpx.post(server.url + "/v1/classify", json={"texts": texts, "labels": SINGLE}, headers=auth("alice"))
        assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
        assert "stopped and not charged" in response.json()["error"]["message"]
        stopped_at = hook.settled()
        assert stopped_at < len(texts)  # stopped between batches, not finished behind the caller's back
        quick = httpx.post(server.url + "/v1/classify", json={"texts": ["a"], "labels": SINGLE}, headers=auth("bob"))
        assert quick.status_code == 200 and hook.calls == stopped_at + 1  # nothing of the abandoned work ran since

        prompts = ["a great movie", "stocks fell", "who wrote hamlet ?", "the team won"]
        full = _forward_passes(server.app.state.engine, hook, prompts, max_tokens=8)
        hook.calls = 0
        response = httpx.post(server.url + "/v1/completions", headers=auth("alice"),
                              json={"prompt": prompts, "max_tokens": 8})
        assert response.status_code == 503
        assert hook.settled() < full, full  # generation stopped between token steps
        usage = httpx.get(server.url + "/v1/usage", headers=auth("alice")).json()["usage"]
        assert usage["queries"] == 0 and usage["prompt_tokens"] == 0 and usage["rejected"] == 2


def _forward_passes(engine, hook: SlowModel, prompts: list[str], max_tokens: int) -> int:
    """How many forward passes the whole completion takes (run directly, without the delay)."""
    from fedprompt.blackbox.engine import CompletionJob

    delay, hook.delay_s, hook.calls = hook.delay_s, 0.0, 0
    engine.complete_group([CompletionJob(engine.plan_prompts(prompts, max_tokens), max_tokens)])
    passes, hook.delay_s, hook.calls = hook.calls, delay, 0
    return passes


def test_a_client_that_disconnects_has_its_work_stopped(tiny, keys):
    model = tiny[0]
    with serving(*tiny, keys, batch_size=1) as server, slow(model, 0.1) as hook:
        texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 2)]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/classify", json={"texts": texts, "labels": SINGLE}, headers=auth("alice"),
                       timeout=httpx.Timeout(5, read=0.3))
        assert hook.settled() < len(texts)
        usage = httpx.get(server.url + "/v1/usage", headers=auth("alice")).json()["usage"]
        assert usage["queries"] == 0


# ---- echo and log-prob memory bounds ----------------------------------------------------------------------

def _echo(client: httpx.Client, prompts: list[str]) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 2})


def test_echo_is_refused_over_its_memory_bound_and_batched_within_it(tiny, keys):
    model, tok = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    bound_mb = 120 * vocab * ECHO_BYTES_PER_LOGIT / 2**20  # 120 positions' logits per forward pass
    with serving(*tiny, keys, Limits(max_echo_mb=bound_mb)) as server, \
            httpx.Client(base_url=server.url, headers=auth("alice"), timeout=60) as client:
        long = "word " * 60  # 241 tokens with the tiny tokenizer
        message = _echo(client, [long]).json()["error"]["message"]
        assert _echo(client, [long]).status_code == 413
        assert "service.limits.max_echo_mb" in message and "at most 120 tokens" in message, message
        assert client.post("/v1/completions", json={"prompt": long, "max_tokens": 1}).status_code == 200  # no echo: fine

        prompts = ["word " * 20, "a great movie " * 7, "stocks fell as oil prices rose " * 3]  # 81, 50, 63 tokens
        engine = server.app.state.engine
        before = engine.forward_calls
        together = _echo(client, prompts).json()["choices"]
        assert engine.forward_calls - before == 3  # one a pass: two, padded to the longer, exceed 120 positions
        for prompt, choice in zip(prompts, together):
            alone = _echo(client, [prompt]).json()["choices"][0]
            assert alone["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
            np.testing.assert_allclose(alone["logprobs"]["token_logprobs"][1:], choice["logprobs"]["token_logprobs"][1:],
                                       atol=1e-5)


def test_top_logprobs_per_answer_are_bounded(tiny, keys):
    with serving(*tiny, keys, Limits(max_logprob_entries=50)) as server, \
            httpx.Client(base_url=server.url, headers=auth("alice"), timeout=60) as client:
        response = client.post("/v1/completions", json={"prompt": "a great movie", "max_tokens": 8, "logprobs": 10})
        assert response.status_code == 413
        message = response.json()["error"]["message"]
        assert "80 top log-probs" in message and "service.limits.max_logprob_entries" in message
        assert client.post("/v1/completions", json={"prompt": "a great movie", "max_tokens": 8, "logprobs": 5}).status_code == 200


# ---- shutdown ---------------------------------------------------------------------------------------------

def test_sigterm_with_the_model_busy_exits_in_seconds(tiny_model_dir, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "fedprompt.cli", "serve", f"model={tiny_model_dir}", f"port={port}",
               "model.dtype=float32", "model.device=cpu", "service.batching.batch_size=1",
               "service.api_keys_env=FEDPROMPT_TEST_NO_KEYS", "service.limits.max_request_tokens=100000000"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _up(url):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.1)
        answers: list = []

        # 6 requests of 256 long texts x 6 labels, one row a pass (max_request_tokens raised to let them in): far
        # more than the 2 s work grace even on a fast machine, so most requests are still waiting at SIGTERM.
        long_text = " ".join(["a great movie with a wonderful cast"] * 8)
        labels = [f" lab {k}" for k in range(6)]

        def send(i: int) -> None:
            texts = [f"text {i} {j} {long_text}" for j in range(256)]
            try:
                reply = httpx.post(url + "/v1/classify", json={"texts": texts, "labels": labels}, timeout=60)
                error = reply.json().get("error") if reply.status_code != 200 else None
                answers.append("answered" if error is None else error["code"] if error["code"] == "shutting_down" else error)
            except Exception as err:  # noqa: BLE001 - recorded and asserted on below
                answers.append(repr(err))

        clients = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["queued_texts"] == 0:
            assert time.monotonic() < deadline and not answers, answers  # refused, or done before it queued
            time.sleep(0.05)
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
        elapsed = time.monotonic() - start
        for thread in clients:
            thread.join(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    assert elapsed < 10, elapsed
    assert server.returncode == 0 and "terminate called" not in stderr and "Traceback" not in stderr, stderr
    # The batch already on the model may finish; what still waits is stopped and answered 503, none is dropped.
    assert len(answers) == 6 and set(answers) <= {"answered", "shutting_down"} and "shutting_down" in answers, answers


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the key of `fedprompt deploy`'s own service ----------------------------------------------------------

def test_the_local_deploy_service_runs_with_a_generated_key_kept_out_of_files(tiny_model_dir, tmp_path, monkeypatch):
    from fedprompt.commands.deploy import DeploySettings, LocalDeployment
    from fedprompt.commands.run import app_dir
    from fedprompt.config import compose

    monkeypatch.delenv("FEDPROMPT_API_KEY", raising=False)
    certs = tmp_path / "certs"
    made = subprocess.run(["bash", str(app_dir() / "scripts" / "make-certs.sh"), str(certs), "--supernodes", "1"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    cfg = compose([f"model={tiny_model_dir}", "model.device=cpu", "model.dtype=float32", "service.kind=http",
                   "federation.num_clients=1"])
    deployment = LocalDeployment(cfg, tmp_path / "run", DeploySettings(certs_dir=str(certs)))
    key = deployment.env["FEDPROMPT_API_KEY"]
    assert len(key) >= 40 and key != LocalDeployment(cfg, tmp_path / "run2", DeploySettings()).env["FEDPROMPT_API_KEY"]
    deployment.folder.mkdir(parents=True)  # what __enter__ does before it starts the pieces
    try:
        deployment.start_service()
        verify = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        assert httpx.get(deployment.service_url + "/health", verify=verify).json()["auth"] is True
        assert httpx.get(deployment.service_url + "/v1/models", verify=verify).status_code == 401
        ok = httpx.get(deployment.service_url + "/v1/models", verify=verify, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    finally:
        deployment.stop()  # the service is the only piece started
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
