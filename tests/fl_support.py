"""Shared pieces of the Flower tests: a task whose training texts are easy to spot, tiny-run overrides, and
a leak detector for captured client-to-server bytes."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import write_task

# Words that are not in the tiny tokenizer's corpus, so no proposer can offer them: finding three of them
# in a row in a message can only mean that training text left the client.
_WORDS = ["zebra", "quokka", "marmalade", "xylophone", "jellyfish", "kumquat", "yodel", "vortex", "ibex",
          "umbrella", "walrus", "origami", "pumpkin", "falafel", "gizmo", "hammock", "igloo", "lasso"]
TRAIN_TEXTS = [" ".join(_WORDS[(i * 5 + j) % len(_WORDS)] for j in range(6)) + f" {i}" for i in range(16)]


def write_secret_task(root: Path) -> Path:
    """Task 'secret' (2 labels): 16 training rows of distinctive words; public/test rows are plain."""
    train = [{"text": t, "label": i % 2} for i, t in enumerate(TRAIN_TEXTS)]
    phrases = ["a great movie", "a terrible film", "wonderful cast", "boring and too long"] * 2
    validation = [{"text": f"{w} {i}", "label": i % 2} for i, w in enumerate(phrases)]  # no test sentence in it
    test = [{"text": w, "label": i % 2} for i, w in enumerate(phrases)]
    write_task(root, "secret", {"train": train, "validation": validation, "test": test}, ["negative", "positive"])
    return root


def tiny_overrides(data_dir: Path, model_dir: Path, clients: int = 2) -> list[str]:
    """A run that costs seconds: the tiny model as black box and proposer, a few queries per client."""
    return [
        f"data_dir={data_dir}", "task=secret", f"model={model_dir}", f"method.proposer.model={model_dir}",
        "method.proposer.vocab_limit=null", "method.search.budget=60", "method.search.local_batch_size=4",
        "method.search.public_batch_size=2", "method.aggregate.min_samples=2", f"federation.num_clients={clients}",
        "federation.rounds=1", "federation.public_size=4", "partition=iid", "partition.k_shot=null", "progress=false",
    ]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def find_leaks(blob: bytes, texts=TRAIN_TEXTS) -> list[str]:
    """Training texts, or runs of >= 3 of their consecutive words, found in ``blob`` (whatever separates them)."""
    decoded = blob.decode("utf-8", errors="ignore")
    tokens = _words(decoded)
    grams = {tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)}
    leaks = []
    for text in texts:
        words = _words(text)
        if text in decoded:
            leaks.append(text)
        leaks += [" ".join(words[i : i + 3]) for i in range(len(words) - 2) if tuple(words[i : i + 3]) in grams]
    return leaks


# --- the processes of a run, found by a marker the test puts in the launcher's environment (all inherit it) ---

MARK_ENV = "FEDPROMPT_TEST_MARK"


def marked_processes(mark: str) -> list:
    """Live processes (zombies are dead) whose environment holds MARK_ENV=mark: the launcher and all it started."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK_ENV) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def wait_until_gone(mark: str, within_s: float) -> float:
    """Seconds until no process holds ``mark``; an AssertionError naming the survivors after ``within_s``
    (they are killed then, so that a failed test leaves nothing behind)."""
    import time

    start = time.monotonic()
    while survivors := marked_processes(mark):
        if time.monotonic() - start > within_s:
            names = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in survivors]
            for proc in survivors:
                proc.kill()
            raise AssertionError(f"{len(survivors)} processes of the run alive {within_s} s after the stop: {names}")
        time.sleep(0.2)
    return time.monotonic() - start
