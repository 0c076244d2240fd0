"""``fedprompt serve``: bad settings fail before the model loads; a real server process starts, answers
and stops on SIGTERM with its summary as the last line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fedprompt.blackbox.runner import free_port
from fedprompt.cli import main


@pytest.mark.parametrize("args, words", [
    (["port=70000"], "service.port"),
    (["service.limits.max_batch=0"], "service.limits.max_batch"),
    (["service.api_keys_file=/no/such/keys"], "does not exist"),
    (["model=no-such-model"], "unknown model"),
    (["service.budget.queries=-1"], "service.budget.queries must be a non-negative integer"),
])
def test_bad_serve_settings_fail_fast(capsys, args, words):
    assert main(["serve", *args]) == 2
    assert words in capsys.readouterr().err


def test_serve_runs_answers_and_stops(tiny_model_dir, tmp_path):
    port = free_port()
    keys = tmp_path / "keys"
    keys.write_text("sk-cli name=cli queries=100\n")
    command = [sys.executable, "-m", "fedprompt.cli", "serve", f"model={tiny_model_dir}", f"port={port}",
               "model.device=cpu", "model.dtype=float32", f"service.api_keys_file={keys}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
        body = httpx.post(url + "/v1/classify", json={"texts": ["a great movie"], "labels": [" p", " ne"]},
                          headers={"Authorization": "Bearer sk-cli"}).json()
        assert body["model"] == str(tiny_model_dir) and len(body["logprobs"][0]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"on http://127.0.0.1:{port}" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["usage"][0]["usage"]["queries"] == 1 and summary["served"] == str(tiny_model_dir)
