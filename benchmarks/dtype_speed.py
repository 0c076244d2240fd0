"""bfloat16 against float32 on this machine, and what ``model.dtype=auto`` picks here.

    python benchmarks/dtype_speed.py [--model smollm2-135m] [--batch 1] [--length 32] [--repeats 3]

Times, in one process and alternately (the machine's noise hits both types): a 1024 x 1024 matrix
product, and one forward pass of the model over a batch of ``--batch`` x ``--length`` tokens, in each
type; the median of ``--repeats`` after one warm-up each (small defaults: an emulated bf16 product
takes seconds). Reports the speed ratios and ``fast_bf16``'s verdict (the check ``dtype=auto`` runs).
Writes benchmarks/results/dtype_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import timeit
from pathlib import Path

import torch

from fedprompt.models import load_causal_lm
from fedprompt.models.registry import fast_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dtype_speed.json"))
    args = parser.parse_args()

    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split() if Path("/proc/cpuinfo").exists() else []
    matrix = torch.randn(1024, 1024)
    models = {dtype: load_causal_lm(args.model, "cpu", name) for dtype, name in
              ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"))}
    ids = torch.randint(100, 10000, (args.batch, args.length))
    jobs = {}
    for dtype, model in models.items():
        x = matrix.to(dtype)
        jobs[str(dtype).removeprefix("torch.")] = {"matmul_1024": lambda x=x: x @ x,
                                                   "forward": lambda m=model: m(input_ids=ids, use_cache=False)}
    timings: dict[str, dict[str, list[float]]] = {"matmul_1024": {}, "forward": {}}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first pass warms up; the two types alternate
            for name, fns in jobs.items():
                for kind, fn in fns.items():
                    timings[kind].setdefault(name, []).append(timeit.timeit(fn, number=1))
    timings = {kind: {name: t[1:] for name, t in by_type.items()} for kind, by_type in timings.items()}
    median = {k: {d: statistics.median(v) for d, v in t.items()} for k, t in timings.items()}
    record = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "avx2": "avx2" in flags},
        "torch": torch.__version__, "model": args.model, "batch": [args.batch, args.length], "repeats": args.repeats,
        "median_s": median,
        "bf16_slowdown": {k: round(m["bfloat16"] / m["float32"], 2) for k, m in median.items()},
        "fast_bf16": fast_bf16("cpu"), "auto_dtype": "bfloat16" if fast_bf16("cpu") else "float32",
        "timings_s": timings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("machine", "median_s", "bf16_slowdown", "auto_dtype")}))


if __name__ == "__main__":
    main()
