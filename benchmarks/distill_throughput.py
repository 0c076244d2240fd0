"""Student steps per second: offline distillation (cached teacher outputs) against online (teacher at every step).

    python benchmarks/distill_throughput.py [--model smollm2-135m] [--steps 10] [--warmup 2] [--batch 8]
                                            [--max-length 96] [--top-k 128] [--dtype float32]
                                            [--loss-positions 0.25 ...]

One process, the same student (the default first 2 + last 2 layers, built afresh for each run), the same texts
(the first (warmup + steps) x batch default distillation texts that fit in max_length, formatted as
`fedprompt distill` formats them) and the same seeded batches. First the teacher cache of those texts is built
(timed apart: it is the one-off), then ``distill`` runs --warmup + --steps steps reading the cache, then the same
steps with the teacher forward at every step. Steps per second over the steps after the warm-up. Target: a ratio
>= 4. ``compute_bound`` is the most the cache can give for these shapes (the student's full-vocabulary head and
backward stay; see :func:`compute_bound`). Then, for each --loss-positions fraction, the cached steps again with
the loss read at that fraction of the positions (``distill.loss_positions``: the LM head runs there only), each
against the same online run (``speedup_at_positions``): a cheaper step, but not the same step, since it sees fewer
positions' targets (an unbiased, noisier estimate of the loss). Writes benchmarks/results/distill_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedprompt.commands.post import distill_texts
from fedprompt.config import compose
from fedprompt.models import load_causal_lm, load_tokenizer
from fedprompt.models.distill import DistillConfig, DistillDataConfig, TeacherCacheConfig, build_student, default_layers, distill
from fedprompt.models.teacher_cache import build_teacher_cache, cache_key


def timed_run(teacher, tokenizer, texts, config, layers, cache, warmup: int) -> dict:
    student = build_student(teacher, layers)
    stamps: dict[int, float] = {}
    start = time.perf_counter()
    report = distill(teacher, student, tokenizer, texts, config, log_every=1, cache=cache,
                     progress=lambda step, row: stamps.__setitem__(step, time.perf_counter()))
    steps = config.steps - warmup
    measured = stamps[config.steps] - stamps[warmup]
    return {"steps_per_s": round(steps / measured, 3), "s_per_step": round(measured / steps, 3),
            "measured_steps": steps, "warmup_steps": warmup, "wall_s": round(time.perf_counter() - start, 2),
            "first_loss": report.curve[0], "last_loss": report.curve[-1], "tokens": report.tokens}


def compute_bound(teacher, layers: list[int]) -> dict:
    """The speedup the cache can give at most, from the models' shapes: per token, online = the teacher's forward
    + the student's step, cached = the student's step alone, a step costing ~3 forwards (forward + backward). A
    forward costs ~2 x (the layers' parameters + the LM head's vocab x hidden); attention's length-dependent part
    is left out (small at these lengths). The student keeps the teacher's full-vocabulary head (tied embeddings),
    which the KL and LM losses need: that head bounds the ratio."""
    config = teacher.config
    head = int(config.vocab_size) * int(config.hidden_size)
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    teacher_forward = per_layer * int(config.num_hidden_layers) + head
    student_step = 3 * (per_layer * len(layers) + head)
    return {"params_per_layer": per_layer, "head_params": head, "teacher_forward_macs_per_token": teacher_forward,
            "student_step_macs_per_token": student_step,
            "speedup_bound": round((teacher_forward + student_step) / student_step, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--loss-positions", type=float, nargs="*", default=[0.25],
                        help="distill.loss_positions fractions (< 1) to time cached beside the full loss")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_throughput.json"))
    args = parser.parse_args()
    if not all(0 < f < 1 for f in args.loss_positions):
        parser.error(f"--loss-positions takes fractions in (0, 1), got {args.loss_positions}")

    cfg = compose([f"model={args.model}"])
    steps = args.warmup + args.steps
    data = DistillDataConfig()
    tokenizer = load_tokenizer(args.model)
    texts = distill_texts(data, cfg.get("data_dir"), cfg.model.get("chat_format"), seed=0)
    lengths = tokenizer(texts[: 20 * steps * args.batch], add_special_tokens=True)["input_ids"]
    texts = [t for t, ids in zip(texts, lengths) if len(ids) <= args.max_length][: steps * args.batch]
    config = DistillConfig(steps=steps, batch_size=args.batch, max_length=args.max_length, lr=6e-4, autocast=False,
                           data=data, teacher_cache=TeacherCacheConfig(top_k=args.top_k))
    start = time.perf_counter()
    teacher = load_causal_lm(args.model, "cpu", args.dtype)
    load_s = time.perf_counter() - start
    layers = default_layers(teacher.config.num_hidden_layers)
    with tempfile.TemporaryDirectory() as root:
        key = cache_key(args.model, str(teacher.dtype).removeprefix("torch."), texts, args.max_length, args.top_k,
                        config.loss.temperature, config.loss.a_cos > 0, config.teacher_cache.hidden_dtype)
        cache, info = build_teacher_cache(teacher, tokenizer, texts, Path(root), key, args.batch)
        cached = timed_run(teacher, tokenizer, texts, config, layers, cache, args.warmup)
        online = timed_run(teacher, tokenizer, texts, config, layers, None, args.warmup)
        at_positions = {str(f): timed_run(teacher, tokenizer, texts, replace(config, loss_positions=f), layers, cache,
                                          args.warmup) for f in args.loss_positions}
    tokens = int(cache.meta["tokens"])
    record = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__, "model": args.model, "dtype": args.dtype, "layers": layers,
        "batch": args.batch, "max_length": args.max_length, "top_k": args.top_k, "texts": len(texts),
        "cache_tokens": tokens, "teacher_load_s": round(load_s, 2),
        "cache_build_s": info["seconds"], "cache_bytes": info["bytes"],
        "cache_bytes_per_token": round(info["bytes"] / tokens, 1),
        "cache_build_s_per_text": round(info["seconds"] / len(texts), 4),
        "cached": cached, "online": online,
        "speedup": round(cached["steps_per_s"] / online["steps_per_s"], 2),
        "compute_bound": compute_bound(teacher, layers),
        "cached_at_positions": at_positions,
        "speedup_at_positions": {f: round(run["steps_per_s"] / online["steps_per_s"], 2) for f, run in at_positions.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("dtype", "batch", "max_length", "top_k", "cache_build_s", "cache_bytes",
                                             "speedup")} | {"cached_steps_per_s": cached["steps_per_s"],
                                                            "online_steps_per_s": online["steps_per_s"],
                                                            "speedup_bound": record["compute_bound"]["speedup_bound"],
                                                            "speedup_at_positions": record["speedup_at_positions"]}))


if __name__ == "__main__":
    main()
