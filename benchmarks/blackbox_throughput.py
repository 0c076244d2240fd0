"""Black-box service throughput: 10 concurrent HTTP clients vs in-process batched scoring, same run.

    python benchmarks/blackbox_throughput.py [--limit N] [--clients 10] [--chunk 16] [--repeats 2]

The SST-2 validation split is formatted with the task's template and the model's chat format (as
``fedprompt eval`` does). In-process = ``InProcessBlackBox.classify`` over all examples (one
length-sorted, batched scoring call) in this process. HTTP = ``fedprompt serve`` in a subprocess
(cache off) and ``--clients`` threads, each an ``HttpBlackBox`` sending its share of the examples in
requests of ``--chunk`` texts; the server merges concurrent requests into shared forward passes. The two
are timed alternately (A B B A ...) ``--repeats`` times each; the ratio of their throughputs over all
repeats is reported (target >= 0.9) with the server's peak RSS (from /health) and how closely the two
agree. On a shared machine the wall-clock ratio carries other processes' noise, so the CPU seconds each
side spent are reported too. Writes benchmarks/results/blackbox_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from omegaconf import OmegaConf

from fedprompt.blackbox import HttpBlackBox, InProcessBlackBox
from fedprompt.blackbox.runner import free_port
from fedprompt.blackbox.server import peak_rss_mb
from fedprompt.config import compose
from fedprompt.data import load_task
from fedprompt.models import load_causal_lm, load_tokenizer


def sst2_inputs(model: str, split: str, limit: int | None) -> tuple[list[str], list[str], list[int]]:
    cfg = compose(["task=sst2", f"model={model}"])
    data_dir = cfg.data_dir or os.environ.get("FEDPROMPT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    task = load_task(OmegaConf.to_container(cfg.task, resolve=True), data_dir)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    examples = task.split(split)[:limit]
    return [spec.format(e) for e in examples], list(spec.label_words), [e.label for e in examples]


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedprompt.cli", "serve", f"model={args.model}", f"model.dtype={args.dtype}",
               "model.device=cpu", f"port={port}", f"service.batching.batch_size={args.batch_size}",
               f"service.batching.wait_ms={args.wait_ms}", "service.cache.enabled=false"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()}")
        time.sleep(0.1)
    raise SystemExit("the server did not come up in 120 s")


def run_http(url: str, texts: list[str], labels: list[str], clients: int, chunk: int) -> tuple[float, np.ndarray]:
    shards = [list(range(i, len(texts), clients)) for i in range(clients)]  # interleaved: similar lengths each
    scores = np.zeros((len(texts), len(labels)), np.float32)
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(shard: list[int]) -> None:
        with HttpBlackBox(url, chunk_size=chunk) as box:
            barrier.wait()
            try:
                scores[shard] = box.classify([texts[i] for i in shard], labels).logprobs
            except BaseException as err:  # reported after the run
                errors.append(err)

    threads = [threading.Thread(target=client, args=(shard,)) for shard in shards]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N validation examples (default: all 872)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=16, help="texts per HTTP request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "blackbox_throughput.json"))
    args = parser.parse_args()

    texts, labels, gold = sst2_inputs(args.model, "validation", args.limit)
    model, tokenizer = load_causal_lm(args.model, "cpu", args.dtype), load_tokenizer(args.model)
    local = InProcessBlackBox(model, tokenizer, batch_size=args.batch_size, model_id=args.model)
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        local.classify(texts[:16], labels)  # warm-up both sides alike
        with HttpBlackBox(url) as warm:
            warm.classify(texts[:16], labels)
        inproc_s, http_s, inproc_cpu, server_cpu = [], [], [], []
        serving = psutil.Process(server.pid)

        def in_process() -> np.ndarray:
            start, cpu = time.perf_counter(), time.process_time()
            scores = local.classify(texts, labels).logprobs
            inproc_s.append(time.perf_counter() - start)
            inproc_cpu.append(time.process_time() - cpu)
            return scores

        def over_http() -> np.ndarray:
            cpu = sum(serving.cpu_times()[:2])
            seconds, scores = run_http(url, texts, labels, args.clients, args.chunk)
            http_s.append(seconds)
            server_cpu.append(sum(serving.cpu_times()[:2]) - cpu)
            return scores

        for repeat in range(args.repeats):
            # A B, B A, ...: a drift in the machine's background load hits both sides alike.
            if repeat % 2 == 0:
                local_scores, http_scores = in_process(), over_http()
            else:
                http_scores, local_scores = over_http(), in_process()
            print(f"in-process {len(texts) / inproc_s[-1]:.1f} ex/s, http x{args.clients} {len(texts) / http_s[-1]:.1f} ex/s",
                  flush=True)
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        server.terminate()
        server.communicate(timeout=60)

    inproc_tput = len(texts) * len(inproc_s) / sum(inproc_s)
    http_tput = len(texts) * len(http_s) / sum(http_s)
    agree = float(np.mean(local_scores.argmax(1) == http_scores.argmax(1)))
    result = {
        "examples": len(texts), "clients": args.clients, "chunk": args.chunk, "repeats": args.repeats,
        "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "wait_ms": args.wait_ms,
        "inprocess_examples_per_s": round(inproc_tput, 2), "http_examples_per_s": round(http_tput, 2),
        "throughput_ratio_http_over_inprocess": round(http_tput / inproc_tput, 3), "target_ratio": 0.9,
        "inprocess_seconds": [round(s, 2) for s in inproc_s], "http_seconds": [round(s, 2) for s in http_s],
        # CPU seconds spent on the same examples: a check that does not depend on what else runs on the machine.
        "inprocess_cpu_s": [round(s, 2) for s in inproc_cpu], "server_cpu_s": [round(s, 2) for s in server_cpu],
        "cpu_ratio_inprocess_over_server": round(sum(inproc_cpu) / sum(server_cpu), 3),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "server_peak_rss_mb": health["peak_rss_mb"], "server_rss_mb_at_end": health["rss_mb"],
        "benchmark_process_peak_rss_mb": round(peak_rss_mb(), 1), "server_merged_calls": health["merged_calls"],
        "server_forward_calls": health["forward_calls"],
        "prediction_agreement": agree, "max_abs_logprob_diff": float(np.abs(local_scores - http_scores).max()),
        "accuracy_inprocess": float(np.mean(local_scores.argmax(1) == np.array(gold))),
        "accuracy_http": float(np.mean(http_scores.argmax(1) == np.array(gold))),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
