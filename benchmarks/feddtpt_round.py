"""One FedDTPT round against the pure model compute of the same black-box queries, in one process.

    python benchmarks/feddtpt_round.py [--task sst2] [--clients 10] [key=value ...]

The round is the plain-Python algorithm the Flower apps wrap: every client's ``PromptSearch.run``
(proposer, bookkeeping, black-box calls through ``InProcessBlackBox`` with its checks and accounting)
one after the other, then ``FedDTPTAggregator.aggregate`` (embedding, knee, DBSCAN). Every black-box
call is recorded. The floor is the model's forward passes alone over exactly those calls' texts, in the
batches the scorer builds (tokenized and padded beforehand, untimed). Round and floor are timed
alternately ``--repeats`` times in the same process (the same round each time: seeded search, fresh
black box), so the machine's noise hits both; the ratio of medians is reported (target <= 1.10).
Remaining ``key=value`` arguments are config overrides, as for ``fedprompt run``.
Writes benchmarks/results/feddtpt_round.json.
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

from fedprompt.blackbox import BlackBoxLM, make_blackbox
from fedprompt.config import compose
from fedprompt.methods.feddtpt import FedDTPTAggregator, PromptSearch, build_proposer
from fedprompt.models import load_causal_lm, load_tokenizer
from fedprompt.models.scoring import _left_pad, encode_label_words, forward_logits, length_sorted_batches
from fedprompt.runs.data import client_data
from fedprompt.runs.run_config import method_config


class Recording(BlackBoxLM):
    """Passes calls through and keeps (texts, labels) of each one."""

    def __init__(self, inner: BlackBoxLM) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def classify(self, texts, labels, labels_only=False):
        self.calls.append((list(texts), tuple(labels)))
        result = self.inner.classify(texts, labels, labels_only)
        self.usage.add(result.usage)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "feddtpt_round.json"))
    args, overrides = parser.parse_known_args()

    cfg = compose([f"task={args.task}", f"federation.num_clients={args.clients}", *overrides])
    method = method_config(cfg)
    data = client_data(cfg)
    search = PromptSearch(method.search, build_proposer(method.proposer))
    aggregator = FedDTPTAggregator(method.aggregate)
    tokenizer = load_tokenizer(str(cfg.model.name))
    model = load_causal_lm(str(cfg.model.name), cfg.model.device, cfg.model.dtype)
    batch_size = int(cfg.batch_size)
    prompt = method.initial_prompt(data.spec)

    def one_round() -> tuple[float, Recording, str]:
        bb = Recording(make_blackbox(cfg, model=model, tokenizer=tokenizer))
        start = time.perf_counter()
        prompts = [search.run(bb, data.spec, prompt, local, data.public, seed=[int(cfg.seed), 1, cid]).prompt
                   for cid, local in enumerate(data.partition.clients)]
        merged = aggregator.aggregate(prompts)
        return time.perf_counter() - start, bb, merged.text

    one_round()  # warm-up: proposer vocabulary, embedder load, allocator
    _, recorded, _ = one_round()
    # The floor's batches: each call's texts tokenized, length-sorted and padded as the scorer does.
    pad = tokenizer.pad_token_id
    batches = []
    for texts, labels in recorded.calls:
        encode_label_words(tokenizer, labels)
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        batches += [_left_pad([ids[i] for i in idx], pad, model.device)
                    for idx in length_sorted_batches([len(x) for x in ids], batch_size)]

    def floor() -> float:
        start = time.perf_counter()
        for input_ids, mask in batches:
            forward_logits(model, input_ids, mask, keep_last=1)
        return time.perf_counter() - start

    round_s, floor_s, prompts = [], [], set()
    for _ in range(args.repeats):
        seconds, bb, text = one_round()
        round_s.append(seconds)
        prompts.add(text)
        floor_s.append(floor())
    queries = sum(len(texts) for texts, _ in recorded.calls)
    result = {
        "benchmark": "feddtpt_round", "task": args.task, "clients": args.clients, "overrides": overrides,
        "black_box_calls": len(recorded.calls), "queries": queries, "forward_batches": len(batches),
        "round_seconds": round_s, "floor_seconds": floor_s,
        "ratio_round_over_floor": statistics.median(round_s) / statistics.median(floor_s),
        "target_ratio": 1.10, "same_prompt_every_repeat": len(prompts) == 1,
        "model": str(cfg.model.name), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "load_average_1m_at_end": os.getloadavg()[0],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}, torch {torch.__version__}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"round {statistics.median(round_s):.1f} s, pure compute {statistics.median(floor_s):.1f} s, "
          f"ratio {result['ratio_round_over_floor']:.3f} (target <= 1.10)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
