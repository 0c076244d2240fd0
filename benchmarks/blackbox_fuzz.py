"""Bounded fuzz of the black-box server: random, malformed and hostile requests; 0 crashes and 0 5xx expected.

    python benchmarks/blackbox_fuzz.py [--requests 10000] [--seed 0] [--max-seconds 1200] [--workers 4]
                                       [--max-rss-growth-mb 150] [--no-scenarios]

Starts ``fedprompt serve`` as a subprocess on 127.0.0.1 (a free port) with a tiny random Llama (or
``--model``), API keys (one with a 3-query budget) and small limits, then sends ``--requests`` requests
from ``--workers`` threads: valid and mutated /v1/classify, /v1/completions and /v1/chat/completions
bodies, random bytes, truncated or deeply nested JSON, NaN, lone surrogates, wrong types, unknown
fields, oversize bodies, bad or missing keys, unknown paths and methods, raw malformed HTTP, and the
abuse of issue 25: bodies sent too slowly, heads that never end, large unauthenticated uploads, clients
that give up before the answer, echo and log-prob requests around their memory bounds.

Then (unless ``--no-scenarios``) the issue's scenarios at full size: 50 unauthenticated 4 MiB uploads held
open at once, and 200 slowloris connections (1 byte every 0.25 s).

Counts answers by status; a crash is the server process dying or /health failing at the end. The server's
RSS is sampled throughout: the JSON reports it at the start, its peak and its growth, which must stay under
``--max-rss-growth-mb``. Writes benchmarks/results/blackbox_fuzz.json. ``run_fuzz`` is also used (with
fewer requests) by the tests.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import string
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx

GOOD_KEY, POOR_KEY = "fuzz-good-key", "fuzz-poor-key"
KEYS_FILE = f"{GOOD_KEY} name=fuzzer\n{POOR_KEY} name=poor queries=3\n"
# Server limits used with the fuzz: small, so that oversize cases are cheap to send and slow ones quick to
# time out. max_echo_mb: ~109 echo positions with the tiny model's 300-token vocabulary.
LIMITS = {"max_batch": 32, "max_labels": 8, "max_prompt_tokens": 256, "max_label_tokens": 8,
          "max_request_tokens": 8192, "max_new_tokens": 8, "max_request_bytes": 65536,
          "body_timeout_s": 1, "header_timeout_s": 1, "max_echo_mb": 0.25, "max_logprob_entries": 1500}
PATHS = ["/v1/classify", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/usage", "/health", "/",
         "/v1", "/v1/classify/", "/docs", "/openapi.json", "/v2/classify", "/v1/usage?all=true", "/%ff", "/v1/../health"]
WORDS = ["a", "great", "movie", "terrible", "film", "positive", "negative", " yes", " no", "Sentiment:", "<s>", "</s>",
         "<pad>", "<|im_start|>", "\n", "\t", "é", "日本", "🙂", "\x00", "\u200b", "\ufeff", "Review:", "?", ""]


def _text(rng: random.Random, max_words: int = 20) -> str:
    kind = rng.random()
    if kind < 0.7:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words)))
    if kind < 0.85:
        codes = (rng.randint(1, 0x2FFFF) for _ in range(rng.randint(0, 30)))
        return "".join(chr(c) if not 0xD800 <= c < 0xE000 else "?" for c in codes)  # surrogates come elsewhere
    if kind < 0.95:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 200)))
    return "word " * rng.randint(200, 400)  # over max_prompt_tokens


def _junk(rng: random.Random):
    return rng.choice([None, True, False, 0, -1, 1.5, 10**30, "", "x", [], {}, [1, 2], {"a": 1}, ["a", 1], [[None]]])


def _mutate(rng: random.Random, body: dict) -> dict:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        keys = list(body)
        if action < 0.3 and keys:
            body[rng.choice(keys)] = _junk(rng)
        elif action < 0.45 and keys:
            body.pop(rng.choice(keys))
        elif action < 0.6:
            body[rng.choice(["foo", "extra", "Texts", "max_token", "logprob"])] = _junk(rng)
        elif action < 0.75 and keys:
            key = rng.choice(keys)
            if isinstance(body[key], list):
                body[key] = body[key] + [_junk(rng)]
        elif action < 0.85 and "texts" in body:
            body["texts"] = [_text(rng)] * rng.choice([0, 33, 100])
        else:
            body[rng.choice(keys or ["x"])] = rng.choice([float("nan"), float("inf"), -(2**70), "\ud800", "\udfff"])
    return body


def _classify(rng):
    if rng.random() < 0.5:  # well-formed: exercises batching, accounting and budgets, not just the validators
        return {"texts": [" ".join(rng.choice(WORDS[:10]) for _ in range(rng.randint(1, 15))) for _ in range(rng.randint(1, 8))],
                "labels": rng.sample([" positive", " negative", " p", " ne", " yes"], rng.randint(1, 3)),
                "labels_only": rng.random() < 0.3}
    labels = rng.sample([" positive", " negative", " yes", " no", " p", " ne", "", " ", "positive", "🙂"], rng.randint(0, 5))
    if rng.random() < 0.1:
        labels = labels + labels[:1]
    return {"texts": [_text(rng) for _ in range(rng.randint(0, 12))], "labels": labels,
            "labels_only": rng.random() < 0.3, **({"model": rng.choice(["tiny", "other"])} if rng.random() < 0.2 else {})}


def _completion(rng):
    if rng.random() < 0.4:
        return {"prompt": rng.choice(["a great movie", ["Review: a film", "stocks fell"]]), "max_tokens": rng.randint(0, 4),
                "temperature": 0, "logprobs": rng.choice([None, 0, 5, 20]), "echo": rng.random() < 0.3}
    body = {"prompt": rng.choice([_text(rng), [_text(rng) for _ in range(rng.randint(0, 5))], [1, 2, 3], ""]),
            "max_tokens": rng.choice([0, 1, 2, 5, 8, 9, 100, -1, None]), "temperature": rng.choice([0, 0.0, 0.5, 1, None]),
            "echo": rng.random() < 0.3}
    for key, values in (("logprobs", [None, 0, 1, 5, 20, 21, -1]), ("stop", [None, "\n", ["a", "b"], [""], ["a"] * 5]),
                        ("n", [1, 2]), ("stream", [False, True]), ("top_p", [1, 0.9]), ("seed", [1]), ("suffix", ["x"]),
                        ("logit_bias", [{"1": 5.0}]), ("best_of", [1, 3]), ("user", ["u"])):
        if rng.random() < 0.25:
            body[key] = rng.choice(values)
    return body


def _chat(rng):
    roles = ["system", "user", "assistant", "tool", "", None]
    messages = [{"role": rng.choice(roles[:3]) if rng.random() < 0.85 else rng.choice(roles[3:]),
                 "content": _text(rng) if rng.random() < 0.9 else _junk(rng)} for _ in range(rng.randint(0, 4))]
    body = {"messages": messages, "max_tokens": rng.choice([None, 0, 1, 4, 9]), "temperature": rng.choice([0, None, 0.7])}
    if rng.random() < 0.4:
        body["logprobs"] = rng.choice([True, False, 3])
        body["top_logprobs"] = rng.choice([None, 0, 2, 20, 21])
    if rng.random() < 0.2:
        body["max_completion_tokens"] = rng.choice([1, 3, 100])
    return body


def _raw_body(rng: random.Random) -> bytes:
    choice = rng.randrange(12)
    valid = json.dumps(_classify(rng)).encode()
    return [
        bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))),
        valid[: rng.randint(0, max(len(valid) - 1, 0))],
        b"[" * rng.randint(100, 100_000),
        b'{"texts": ["a"], "labels": [" p", " ne"], "x": NaN}',
        b'{"texts": ["\\ud800"], "labels": [" p"]}',
        b'{"texts": ["a"], "labels": [" p"], "labels_only": true, "labels_only": false}',
        b"null", b'"just a string"', b"12345", b"\xef\xbb\xbf" + valid, b"",
        valid.replace(b'"', b"'"),
    ][choice]


def _headers(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.8:
        key = GOOD_KEY
    elif r < 0.85:
        key = POOR_KEY
    else:
        return rng.choice([{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                           {"Authorization": "Bearer"}, {"Authorization": "bearer " + GOOD_KEY + " x"}])
    headers = {"Authorization": f"Bearer {key}"}
    if rng.random() < 0.1:
        headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                              "application/json; charset=latin-1", "multipart/form-data"])
    return headers


def _raw_http(base_url: str, rng: random.Random) -> int | None:
    """Malformed HTTP straight on a socket; the status of the answer, or None if the server just closed."""
    parts = urlsplit(base_url)
    request = rng.choice([
        b"GARBAGE\r\n\r\n",
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"texts\"",  # body shorter than declared
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
        bytes(rng.randrange(256) for _ in range(200)),
        b"GET /health HTTP/9.9\r\n\r\n",
    ])
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            data = sock.recv(64)
    except OSError:
        return None
    return _status_of(data)


def _status_of(data: bytes) -> int | None:
    if data.startswith(b"HTTP/1.1 ") and data[9:12].isdigit():
        return int(data[9:12])
    return None


def _answer(sock: socket.socket, timeout_s: float = 10.0) -> int | None:
    sock.settimeout(timeout_s)
    try:
        return _status_of(sock.recv(64))
    except OSError:
        return None


def _slow_body(base_url: str, rng: random.Random) -> int | None:
    """A key and a declared body, then part of it, slower than body_timeout_s allows: 408 expected."""
    parts = urlsplit(base_url)
    length = rng.randint(50, 5000)
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GOOD_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(head + b'{"texts": ["a')
            for _ in range(rng.randint(0, 3)):  # a trickle, never the whole body
                time.sleep(0.3)
                sock.sendall(b"a")
            return _answer(sock)
    except OSError:
        return None


def _slow_head(base_url: str, rng: random.Random) -> int | None:
    """Slowloris: a request head that never ends; the server must close it after header_timeout_s (408)."""
    parts = urlsplit(base_url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
            for _ in range(rng.randint(0, 3)):
                time.sleep(0.3)
                sock.sendall(b"X")
            return _answer(sock)
    except OSError:
        return None


def _big_unauthenticated(base_url: str, rng: random.Random) -> int | None:
    """Up to 1 MiB without a valid key: 401 before the body is read (the client may see a reset instead)."""
    parts = urlsplit(base_url)
    size = rng.choice([200_000, 1 << 20])
    framing = rng.choice([f"Content-Length: {size}", "Transfer-Encoding: chunked"])
    key = rng.choice(["", "Authorization: Bearer nope\r\n"])
    head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\n{key}{framing}\r\n\r\n".encode()
    body = b"a" * size if framing.startswith("Content") else b"%x\r\n%s\r\n" % (size, b"a" * size)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(head)
            sock.settimeout(2)
            try:
                sock.sendall(body)
            except OSError:
                pass  # the server answered and closed without reading: expected
            return _answer(sock)
    except OSError:
        return None


def _echo_body(rng: random.Random) -> dict:
    """Echo and log-prob requests on both sides of max_echo_mb and max_logprob_entries."""
    words = rng.randint(5, 60)
    prompts = [" ".join(rng.choice(WORDS[:10]) for _ in range(words)) for _ in range(rng.randint(1, 4))]
    return {"prompt": prompts, "max_tokens": rng.choice([0, 1, 2]), "echo": True,
            "logprobs": rng.choice([None, 0, 1, 5, 20])}


def one_request(client: httpx.Client, base_url: str, rng: random.Random) -> tuple[int | None, str]:
    kind = rng.random()
    try:
        if kind < 0.005:
            return _slow_body(base_url, rng), "slow-body"
        if kind < 0.01:
            return _slow_head(base_url, rng), "slow-head"
        if kind < 0.02:
            return _big_unauthenticated(base_url, rng), "big-unauthenticated"
        if kind < 0.03:  # the client gives up before the answer: the server stops the work, keeps serving
            body = _echo_body(rng) if rng.random() < 0.5 else _classify(rng)
            path = "/v1/completions" if "prompt" in body else "/v1/classify"
            try:
                timeout = rng.choice([0.001, 0.01, 0.05])
                return client.post(path, json=body, headers=_headers(rng), timeout=timeout).status_code, "client-timeout"
            except httpx.TimeoutException:
                return None, "client-timeout"
        if kind < 0.06:
            return client.post("/v1/completions", json=_echo_body(rng), headers=_headers(rng)).status_code, "echo"
        if kind < 0.09:
            return _raw_http(base_url, rng), "raw-http"
        if kind < 0.11:
            body = b'{"texts": ["' + b"a" * (LIMITS["max_request_bytes"] + 10) + b'"], "labels": [" p"]}'
            return client.post("/v1/classify", content=body, headers=_headers(rng)).status_code, "oversize"
        if kind < 0.17:
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"])
            return client.request(method, rng.choice(PATHS), headers=_headers(rng)).status_code, f"{method}-path"
        if kind < 0.29:
            path = rng.choice(PATHS[:3])
            return client.post(path, content=_raw_body(rng), headers=_headers(rng)).status_code, "raw-body"
        path, make = rng.choice([("/v1/classify", _classify), ("/v1/completions", _completion), ("/v1/chat/completions", _chat)])
        body = make(rng)
        if rng.random() < 0.5:
            body = _mutate(rng, body)
        # ensure_ascii=False sometimes: then a lone surrogate goes out as invalid UTF-8 bytes instead of an escape.
        content = json.dumps(body, allow_nan=True, ensure_ascii=rng.random() < 0.7).encode("utf-8", "surrogatepass")
        return client.post(path, content=content, headers={"Content-Type": "application/json", **_headers(rng)}).status_code, path
    except httpx.HTTPError as err:
        return None, f"no-answer:{type(err).__name__}"


class RssSampler:
    """The server's resident memory, sampled in a thread (psutil on its pid): first value, peak, last."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        import psutil

        self.process, self.every_s = psutil.Process(pid), every_s
        self.start = self.peak = self.last = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.last = self._rss()
            except Exception:  # noqa: BLE001 - the server has gone: the caller reports that
                return
            self.peak = max(self.peak, self.last)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"rss_start_mb": round(self.start, 1), "rss_peak_mb": round(self.peak, 1),
                "rss_end_mb": round(self.last, 1), "rss_growth_mb": round(self.peak - self.start, 1)}


def run_fuzz(base_url: str, n_requests: int = 10_000, seed: int = 0, workers: int = 4, max_seconds: float = 1200) -> dict:
    """Send ``n_requests`` fuzz requests (bounded by ``max_seconds``); count statuses, overall and per kind of
    request; check /health after."""
    statuses: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    five_xx: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    start = time.perf_counter()
    local = threading.local()

    def work(i: int) -> None:
        if time.monotonic() > deadline:
            return
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=60)
        status, what = one_request(local.client, base_url, random.Random(seed * 1_000_003 + i))
        kind = what.split(":")[0] if not what.startswith("/") else what
        with lock:
            statuses["none" if status is None else status] += 1
            by_kind.setdefault(kind, Counter())["none" if status is None else status] += 1
            if status is not None and status >= 500:
                five_xx.append(f"#{i} {what} -> {status}")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(n_requests)))
    elapsed = time.perf_counter() - start
    try:
        health = httpx.get(base_url + "/health", timeout=30).status_code
    except httpx.HTTPError:
        health = None
    sent = sum(statuses.values())
    return {"requests": sent, "seconds": round(elapsed, 2), "statuses": _sorted(statuses),
            "by_kind": {k: _sorted(v) for k, v in sorted(by_kind.items())},
            "five_xx": len(five_xx), "five_xx_examples": five_xx[:10], "health_after": health,
            "alive": health == 200, "no_answer": statuses.get("none", 0)}


def _sorted(counts: Counter) -> dict:
    return {str(k): v for k, v in sorted(counts.items(), key=str)}


def held_uploads(base_url: str, rss: RssSampler, n: int = 50, size: int = 4 << 20) -> dict:
    """Issue 25's first scenario: ``n`` unauthenticated uploads of ``size`` bytes, all held open at once. The
    server answers 401 from the headers and reads none of it: its memory must not grow with the uploads."""
    parts = urlsplit(base_url)
    before = rss.last
    socks, statuses = [], Counter()
    for _ in range(n):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        sock.settimeout(0.5)
        try:  # as much as the server lets in before it answers and closes
            sock.sendall(b"a" * size)
        except OSError:
            pass
        socks.append(sock)
    time.sleep(1.0)  # let the sampler see the held state
    held_peak = rss.peak
    for sock in socks:
        statuses["none" if (status := _answer(sock, 2)) is None else status] += 1
        sock.close()
    return {"uploads": n, "upload_mb": size / 2**20, "statuses": _sorted(statuses),
            "rss_before_mb": round(before, 1), "rss_peak_while_held_mb": round(held_peak, 1),
            "rss_growth_mb": round(held_peak - before, 1)}


def slowloris(base_url: str, n: int = 200, every_s: float = 0.25, for_s: float = 4.0) -> dict:
    """Issue 25's second scenario: ``n`` connections that each send one more header byte every ``every_s``.
    The server must close them once header_timeout_s has passed; how many were still open after ``for_s``."""
    import select

    parts = urlsplit(base_url)
    socks = {socket.create_connection((parts.hostname, parts.port), timeout=10) for _ in range(n)}
    for sock in socks:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
    open_socks, answered = set(socks), Counter()
    start = time.monotonic()
    while open_socks and time.monotonic() - start < for_s:
        readable, _, _ = select.select(list(open_socks), [], [], every_s)
        for sock in readable:  # the server answered (408) or closed: this one is over
            answered["none" if (status := _answer(sock, 1)) is None else status] += 1
            open_socks.discard(sock)
        for sock in list(open_socks):
            try:
                sock.sendall(b"X")
            except OSError:
                open_socks.discard(sock)
                answered["none"] += 1
    still_open = len(open_socks)
    for sock in socks:
        sock.close()
    return {"connections": n, "byte_every_s": every_s, "watched_s": for_s, "closed_by_server": n - still_open,
            "still_open": still_open, "answers": _sorted(answered)}


def main() -> None:
    import subprocess
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=1200)
    parser.add_argument("--max-rss-growth-mb", type=float, default=150.0,
                        help="fail when the server's RSS grows more than this over the whole benchmark")
    parser.add_argument("--no-scenarios", action="store_true", help="skip the held uploads and slowloris scenarios")
    parser.add_argument("--model", default=None, help="model to serve; default: a tiny random Llama built here")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "blackbox_fuzz.json"))
    args = parser.parse_args()

    from fedprompt.blackbox.runner import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.conftest import make_tiny_model  # the tests' tiny Llama: no download

            model = str(make_tiny_model(Path(tmp) / "tiny"))
        keys = Path(tmp) / "keys.txt"
        keys.write_text(KEYS_FILE)
        port = free_port()
        command = [sys.executable, "-m", "fedprompt.cli", "serve", f"model={model}", f"port={port}", "service.model_id=tiny",
                   f"service.api_keys_file={keys}", "model.dtype=float32", "model.device=cpu",
                   *[f"service.limits.{k}={v}" for k, v in LIMITS.items()]]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        base_url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"server exited: {server.stderr.read()}")
                time.sleep(0.1)
            rss = RssSampler(server.pid)
            result = run_fuzz(base_url, args.requests, args.seed, args.workers, args.max_seconds)
            if not args.no_scenarios:
                result["scenarios"] = {"held_unauthenticated_uploads": held_uploads(base_url, rss),
                                       "slowloris": slowloris(base_url)}
                result["alive"] = result["alive"] and _health(base_url) == 200
            result["server_exited"] = server.poll() is not None
            result.update(rss.stop())
            result["peak_rss_mb"] = httpx.get(base_url + "/health", timeout=10).json().get("peak_rss_mb") if result["alive"] else None
        finally:
            stop_start = time.monotonic()
            server.terminate()
            try:
                _, stderr = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                _, stderr = server.communicate()
            shutdown_s = time.monotonic() - stop_start
    result.update({"seed": args.seed, "workers": args.workers, "limits": LIMITS, "shutdown_s": round(shutdown_s, 2),
                   "server_tracebacks": stderr.count("Traceback"), "server_traceback_examples": _tracebacks(stderr),
                   "max_rss_growth_mb": args.max_rss_growth_mb,
                   "rss_bounded": result["rss_growth_mb"] <= args.max_rss_growth_mb})
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = result["five_xx"] == 0 and result["alive"] and not result["server_exited"] and result["rss_bounded"]
    print(f"fuzz: {result['requests']} requests, {result['five_xx']} answers 5xx, server RSS +{result['rss_growth_mb']} MB "
          f"(bound {args.max_rss_growth_mb:g}), server {'alive' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


def _tracebacks(log: str, n: int = 3) -> list[str]:
    """The last lines of the first ``n`` tracebacks in the server's log (what raised, and where)."""
    blocks = log.split("Traceback (most recent call last):")[1:n + 1]
    return ["\n".join(block.strip().splitlines()[-4:]) for block in blocks]


def _health(base_url: str) -> int | None:
    try:
        return httpx.get(base_url + "/health", timeout=30).status_code
    except httpx.HTTPError:
        return None


if __name__ == "__main__":
    main()
