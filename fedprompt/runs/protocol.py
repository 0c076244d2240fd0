"""The result protocol's part of every run: its untuned references, its per-example predictions, and where
it came from (docs/experiments.md, "The result protocol").

- **References.** Two untuned prompts are scored on the run's evaluation examples: the task's manual prompt
  and zero-shot (no instruction). The run's *reference* is the one that scores higher on the **validation**
  split (``federation.reference_limit`` examples; a tie goes to the manual prompt), decided there and
  recorded, never on the evaluation split; summary.json carries ``manual_accuracy``, ``zero_shot_accuracy``,
  ``reference_kind``, ``reference_accuracy`` (on the evaluation examples) and ``reference_choice`` (the
  validation scores that decided it).
- **Predictions.** predictions.npz holds one entry per evaluation example: ``ids`` (content ids,
  fedprompt.data.leakage.content_ids), ``label``, ``manual``, ``zero_shot`` and ``final`` (the last round's
  global prompt), class indices only, no text. ``fedprompt report`` pairs them for its bootstrap and checks
  them against summary.json's ``eval_n`` and ``eval_ids_sha256``.
- **Provenance.** ``config_sha256``, the SHA-256 of the resolved config's JSON (written by the server), and
  ``git_commit`` / ``git_dirty`` of the checkout that launched the run (added by the launcher: the apps run
  from the FAB Flower unpacks elsewhere, which is no git checkout).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedprompt.data import Example, TaskSpec
from fedprompt.data.leakage import content_ids, ids_digest

# What a method's server supplies: predicted class per example for an untuned instruction text.
Predict = Callable[[Sequence[Example], str], np.ndarray]
# Reference kind -> its array in predictions.npz (fedprompt report pairs the final prompt with it).
PREDICTION_KEY = {"manual": "manual", "zero-shot": "zero_shot"}


def untuned_prompts(spec: TaskSpec) -> dict[str, str]:
    return {"manual": spec.manual_prompt, "zero-shot": ""}


def _accuracy(predictions: np.ndarray, examples: Sequence[Example]) -> float:
    return float(np.mean(np.asarray(predictions) == np.array([e.label for e in examples])))


def _save_examples(report, evaluation: Sequence[Example]) -> None:
    """The evaluation examples' content ids and labels in predictions.npz, and the ids' digest in the facts."""
    ids = content_ids(evaluation)
    report.info["eval_ids_sha256"] = ids_digest(ids)
    report.save_predictions(ids=ids, label=np.array([e.label for e in evaluation], dtype=np.int16))


def measure_references(report, predict: Predict, spec: TaskSpec, evaluation: Sequence[Example],
                       validation: Sequence[Example]) -> None:
    """Score both untuned prompts on ``evaluation``, choose the reference on ``validation`` (the same list
    when the run evaluates on validation), and write them into ``report`` (info and predictions.npz).
    A resumed run that measured them before its stop keeps what it measured."""
    if report.info.get("reference_kind") and set(PREDICTION_KEY.values()) <= set(report.predictions):
        return
    on_eval = {kind: np.asarray(predict(evaluation, text)) for kind, text in untuned_prompts(spec).items()}
    if validation is evaluation:
        on_validation = on_eval
    else:
        on_validation = {kind: np.asarray(predict(validation, text)) for kind, text in untuned_prompts(spec).items()}
    choice = {kind: _accuracy(p, validation) for kind, p in on_validation.items()}
    kind = "manual" if choice["manual"] >= choice["zero-shot"] else "zero-shot"
    accuracy = {kind: _accuracy(p, evaluation) for kind, p in on_eval.items()}
    report.info.update(
        manual_accuracy=accuracy["manual"], zero_shot_accuracy=accuracy["zero-shot"], reference_kind=kind,
        reference_accuracy=accuracy[kind],
        reference_choice={"split": "validation", "n": len(validation), **choice},  # accuracy per kind
    )
    _save_examples(report, evaluation)
    report.save_predictions(**{PREDICTION_KEY[k]: p.astype(np.int16) for k, p in on_eval.items()})


def round_accuracy(report, evaluation: Sequence[Example], server_round: int, last_round: int,
                   predictions: np.ndarray | None) -> float | None:
    """A round's accuracy from its predictions (None: not scored this round, ``federation.eval_every``); the
    last round's predictions go to predictions.npz as ``final``."""
    if predictions is None:
        return None
    if server_round == last_round:
        if "ids" not in report.predictions:  # references off: ids and labels still make the file usable
            _save_examples(report, evaluation)
        report.save_predictions(final=np.asarray(predictions).astype(np.int16))
    return _accuracy(predictions, evaluation)


def provenance(cfg) -> dict:
    """What the server records of where its run came from: ``config_sha256`` of the resolved config, and
    ``model_dtype``, the precision ``model.dtype`` resolves to on this machine (``auto`` is bf16 on a CPU with
    AVX512-BF16 and float32 on one without, so one config scores differently on two machines: docs/feddtpt.md
    traces one such difference). The in-process black box and the clients' local models load that precision."""
    from fedprompt.models.registry import resolve_device, resolve_dtype

    model = cfg.get("model") or {}
    dtype = resolve_dtype(model.get("dtype"), resolve_device(model.get("device")))
    return {"config_sha256": config_sha256(cfg), "model_dtype": str(dtype).removeprefix("torch.")}


def git_state() -> dict:
    """``git_commit`` / ``git_dirty`` of the fedprompt checkout this process imports (None outside a git
    checkout, e.g. a wheel install or the FAB a Flower app runs from)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def config_sha256(cfg) -> str:
    """SHA-256 of the resolved config without the launch settings a resume may change (its folder, port,
    timeout, progress bars): two runs of one experiment in two folders hash alike."""
    from fedprompt.runs.resume import VOLATILE
    from fedprompt.runs.run_config import serialize_config

    data = json.loads(serialize_config(cfg))
    for key in VOLATILE:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) or {}
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
