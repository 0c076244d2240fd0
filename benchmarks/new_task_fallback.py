"""A shared task seen as a new one (issue 26): the fallback prompt (conf/task/custom.yaml) with and without its
default calibration, the majority class, and the config `fedprompt task init` would write, all on test[:N].

    PYTHONPATH=. python benchmarks/new_task_fallback.py --tasks sst2 mr --test 200 --validation 100

Each task folder of $FEDPROMPT_DATA_DIR is read through task=custom (no config of its own). The init
candidates are chosen on a seeded sample of validation, as `fedprompt task init` does; test is scored once
per task for the fallback and once for the chosen candidate. Results: benchmarks/results/new_task_fallback.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mr", "trec", "agnews", "rte"])
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--validation", type=int, default=100)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-init", action="store_true", help="only the fallback (and the majority class)")
    parser.add_argument("--out", default="benchmarks/results/new_task_fallback.json")
    args = parser.parse_args()

    from fedprompt.config import compose
    from fedprompt.data import load_task
    from fedprompt.models import load_causal_lm, load_tokenizer, score_label_words
    from fedprompt.models.calibration import CalibrationSettings, apply_bias, calibration_examples, estimate_bias, majority_rate
    from fedprompt.task_init import candidates, score_candidates, validation_sample
    from fedprompt.ties import pick_labels

    data_dir = Path(os.environ["FEDPROMPT_DATA_DIR"])
    cfg = compose(["task=custom", "task.name=x", f"model.dtype={args.dtype}"])
    tokenizer = load_tokenizer(str(cfg.model.name))
    model = load_causal_lm(str(cfg.model.name), "cpu", args.dtype)
    results = []
    for name in args.tasks:
        start = time.perf_counter()
        task_cfg = OmegaConf.to_container(cfg.task)
        folder = data_dir / name
        first = json.loads((folder / "validation.jsonl").open().readline())
        task_cfg.update(name=f"new-{name}", path=str(folder), is_pair="text_pair" in first)
        if task_cfg["is_pair"]:  # the fallback's template has no {text_pair}: the one task init's pair candidates use
            task_cfg["template"] = "{prompt}\n\nText 1: {text}\nText 2: {text_pair}"
        task = load_task(task_cfg)
        spec = task.spec.with_chat_format(cfg.model.chat_format)
        settings = CalibrationSettings.from_task(task_cfg)
        calib = calibration_examples(task.split("train"), settings, spec.num_labels, 0)
        test = task.split("test")[: args.test]
        gold = np.array([e.label for e in test])

        def accuracy(shown, prompt, words, test=test, calib=calib, gold=gold):  # bound now: it runs in this iteration
            inputs = [shown.format(e, prompt) for e in test]
            raw = score_label_words(model, tokenizer, inputs, words, 16)
            bias = estimate_bias(lambda rows: score_label_words(model, tokenizer, [shown.format(e, prompt) for e in rows],
                                                                words, 16), calib)
            return (float((pick_labels(raw, inputs)[0] == gold).mean()),
                    float((pick_labels(apply_bias(raw, bias), inputs)[0] == gold).mean()))

        fallback_raw, fallback_cal = accuracy(spec, None, spec.label_words)
        print(f"{name}: fallback {fallback_raw:.3f} uncalibrated, {fallback_cal:.3f} calibrated, majority "
              f"{majority_rate(gold):.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        row = {"task": name, "test_n": len(test), "majority": majority_rate(gold), "fallback_uncalibrated": fallback_raw,
               "fallback_calibrated": fallback_cal}
        if not args.no_init:
            found = candidates(spec.labels, spec.is_pair)
            sample = validation_sample(task.split("validation"), args.validation, 0)
            score_candidates(model, tokenizer, spec, found, sample, calib)
            best = max(found, key=lambda c: c.accuracy)
            chosen = replace(spec, template=best.template, answer_prefix=best.answer_prefix, label_words=best.label_words)
            init_raw, init_cal = accuracy(chosen, best.prompt, best.label_words)
            row.update(init_validation_n=len(sample), init_validation_accuracy=best.accuracy,
                       init_test_calibrated=init_cal, init_test_uncalibrated=init_raw, init_chosen=best.to_dict())
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    record = {"model": str(cfg.model.name), "dtype": args.dtype, "device": "cpu", "threads": os.cpu_count(),
              "machine": platform.platform(), "calibration_examples": settings.examples, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
