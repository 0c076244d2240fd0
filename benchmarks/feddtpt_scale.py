"""FedDTPT at scale: one `fedprompt run` with many simulated clients (few queries each), peak memory.

    python benchmarks/feddtpt_scale.py [--clients 1000] [--rounds 1] [key=value ...]

Runs the real command (private SuperLink, `flwr run`, Ray backend) as a subprocess and samples the RSS
of its whole process tree (launcher, SuperLink, ServerApp, Ray workers and actors) every 0.5 s. Each
client holds one or two SST-2 training examples and may send a few dozen queries; the server aggregates
every client's prompt. Reports wall time, the run's own figures, and the peak of the tree's summed RSS
(an upper bound on the memory the run needed: shared pages are counted once per process).
Writes benchmarks/results/feddtpt_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def tree_rss_mb(root: psutil.Process) -> tuple[float, int]:
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20, len(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "feddtpt_scale.json"))
    args, overrides = parser.parse_known_args()

    folder = Path(tempfile.mkdtemp(prefix="fedprompt-scale-"))
    # One example per client (k_shot per class = clients / 2 on SST-2), a 1+2 example batch, 12 queries:
    # the start prompt and one step of three candidates.
    command = [
        sys.executable, "-m", "fedprompt.cli", "run", "task=sst2", "partition=iid",
        f"partition.k_shot={max(1, args.clients // 2)}", f"federation.num_clients={args.clients}",
        f"federation.rounds={args.rounds}", "federation.eval_limit=200", "federation.public_size=16",
        "method.search.budget=12", "method.search.local_batch_size=1", "method.search.public_batch_size=2",
        "method.search.candidates_per_step=3", "progress=false", f"output_dir={folder}", *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = {"mb": 0.0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            mb, count = tree_rss_mb(root)
            if mb > peak["mb"]:
                peak.update(mb=mb, processes=count)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"fedprompt run failed ({proc.returncode}):\n{output[-3000:]}")
    run = json.loads(output.strip().splitlines()[-1])
    result = {
        "benchmark": "feddtpt_scale", "clients": args.clients, "rounds": args.rounds, "overrides": overrides,
        "wall_s": round(wall, 1), "peak_tree_rss_mb": round(peak["mb"], 1), "processes_at_peak": peak["processes"],
        "client_replies": run.get("client_replies"), "failures": run.get("failures"), "queries": run.get("queries"),
        "queries_per_client_round": run.get("queries_per_client_round"),
        "bytes_up_per_client_round": run.get("bytes_up_per_client_round"),
        "initial_accuracy": run.get("initial_accuracy"), "final_accuracy": run.get("final_accuracy"),
        "final_prompt": run.get("final_prompt"), "run_folder": str(folder),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.clients} clients: {wall:.0f} s, {run.get('client_replies')} replies, peak RSS {peak['mb']:.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
