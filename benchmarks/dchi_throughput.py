"""How fast the d_chi privatizer runs, and how exact its nearest-token search is.

    python benchmarks/dchi_throughput.py                 # 10,000 AG News examples (train + validation), eta 30
    python benchmarks/dchi_throughput.py --task sst2 --examples 2000 --threads 1

Privatizes ``--examples`` texts of ``--task`` (train split, then validation, then test) with the
service model's embeddings (SmolLM2-135M by default) and reports tokens/s and the wall time. On a
sample of ``--check`` tokens it also compares the search (bf16 shortlist + exact float32 re-rank) with a
brute-force float32 argmin over the whole vocabulary, in the same run: the agreement and the speed ratio;
and the blockwise shortlist against a plain top-k over the whole vocabulary (the speed ratio, same answers).
Writes benchmarks/results/dchi_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedprompt.config import compose  # noqa: E402
from fedprompt.privacy.dchi import DChiConfig, load_privatizer, sample_noise  # noqa: E402
from fedprompt.runs.data import load_task_and_spec  # noqa: E402


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="agnews")
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--eta", type=float, default=30.0)
    parser.add_argument("--check", type=int, default=2048, help="tokens compared with a brute-force search")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/dchi_throughput.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose([f"task={args.task}"])
    task, _ = load_task_and_spec(cfg)
    rows = [e for split in ("train", "validation", "test") for e in task.split(split)][: args.examples]
    privatizer, tokenizer = load_privatizer(DChiConfig(eta=args.eta), str(cfg.model.name))

    start = time.perf_counter()
    ids = [tokenizer(e.text, add_special_tokens=False)["input_ids"] for e in rows]
    tokenize_s = time.perf_counter() - start
    tokens = sum(len(s) for s in ids)
    start = time.perf_counter()
    private = privatizer.privatize_ids(ids, seed=0)
    privatize_s = time.perf_counter() - start
    unchanged = float(np.mean([a == b for s, p in zip(ids, private) for a, b in zip(s, p)]))

    flat = torch.tensor([t for s in ids for t in s][: args.check])
    points = privatizer.embedding[flat] + torch.from_numpy(sample_noise(flat.numel(), privatizer.dim, args.eta,
                                                                        np.random.default_rng(1)))
    start = time.perf_counter()
    fast = privatizer.nearest(points)
    fast_s = time.perf_counter() - start
    # The blockwise shortlist against a plain topk over the whole vocabulary, on the same points (best of 3).
    blockwise_s = min(timed(privatizer.nearest, points) for _ in range(3))
    blockwise = privatizer._top_scores
    privatizer._top_scores = lambda coarse: coarse.topk(privatizer.shortlist, dim=1).indices
    full_topk_s = min(timed(privatizer.nearest, points) for _ in range(3))
    same_as_full_topk = bool(torch.equal(privatizer.nearest(points), fast))
    privatizer._top_scores = blockwise
    candidates = privatizer.embedding[privatizer.allowed]
    start = time.perf_counter()
    exact = privatizer.allowed[torch.cat([torch.cdist(chunk, candidates).argmin(1) for chunk in points.split(512)])]
    exact_s = time.perf_counter() - start

    result = {
        "task": args.task, "examples": len(rows), "tokens": tokens, "eta": args.eta, "model": str(cfg.model.name),
        "vocabulary": int(privatizer.allowed.numel()), "dim": privatizer.dim, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "tokenize_s": round(tokenize_s, 2), "privatize_s": round(privatize_s, 2),
        "tokens_per_s": round(tokens / privatize_s), "unchanged_fraction": round(unchanged, 4),
        "check_tokens": int(flat.numel()), "agreement_with_brute_force": float((fast == exact).float().mean()),
        "search_speedup_vs_fp32_brute_force": round(exact_s / fast_s, 2),
        "search_speedup_vs_full_topk": round(full_topk_s / blockwise_s, 2), "same_as_full_topk": same_as_full_topk,
    }
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
