"""Batched prompted evaluation vs. the floor: the same padded batches through plain ``model(...)`` calls.

    python benchmarks/eval_throughput.py [--task sst2] [--split validation] [--limit 400] [--repeats 3]

Ours = ``PromptedClassifier.log_scores`` (templating, tokenization, length sorting, left padding,
forward, label-word gather). Floor = only the forward passes over identical, pre-built batches. Both
are timed alternately in one process, ``--repeats`` times each; the median of each is compared, so the
machine's noise hits both. Target: throughput ratio ours/floor >= 0.9. Writes
benchmarks/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fedprompt.config import compose
from fedprompt.data import load_task
from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer
from fedprompt.models.scoring import _left_pad, length_sorted_batches, position_ids_from_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_throughput.json"))
    args = parser.parse_args()

    cfg = compose([f"task={args.task}", f"model={args.model}", f"model.dtype={args.dtype}"])
    data_dir = cfg.data_dir or os.environ.get("FEDPROMPT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    task = load_task(dict(cfg.task), data_dir)
    spec = task.spec.with_chat_format(cfg.model.chat_format)
    examples = task.split(args.split)[: args.limit]
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, cfg.model.device, cfg.model.dtype)
    classifier = PromptedClassifier(model, tokenizer, spec, batch_size=args.batch_size)

    # The floor's batches: exactly what the scorer builds (same order, same padding), built untimed.
    encoded = tokenizer(classifier.inputs(examples), add_special_tokens=True)["input_ids"]
    pad = tokenizer.pad_token_id
    order = length_sorted_batches([len(e) for e in encoded], args.batch_size)
    batches = [_left_pad([encoded[i] for i in idx], pad, model.device) for idx in order]

    def ours() -> float:
        start = time.perf_counter()
        classifier.log_scores(examples)
        return time.perf_counter() - start

    @torch.no_grad()
    def floor() -> float:
        start = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        return time.perf_counter() - start

    floor()  # warm-up (allocator, kernels)
    ours_s, floor_s = [], []
    for _ in range(args.repeats):
        ours_s.append(ours())
        floor_s.append(floor())
    n = len(examples)
    result = {
        "benchmark": "eval_throughput",
        "task": args.task, "split": args.split, "n": n, "batch_size": args.batch_size,
        "model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.device), "threads": torch.get_num_threads(),
        "ours_examples_per_s": n / statistics.median(ours_s),
        "floor_examples_per_s": n / statistics.median(floor_s),
        "ratio": statistics.median(floor_s) / statistics.median(ours_s),
        "target_ratio": 0.9,
        "ours_seconds": ours_s, "floor_seconds": floor_s,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}, torch {torch.__version__}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours {result['ours_examples_per_s']:.1f} ex/s, floor {result['floor_examples_per_s']:.1f} ex/s, "
          f"ratio {result['ratio']:.3f} (target >= 0.9)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
