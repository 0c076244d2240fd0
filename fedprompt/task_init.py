"""``fedprompt task init <folder>``: a task config of the folder's own, its prompt chosen on validation.

A folder in the shared format works with no config at all (conf/task/custom.yaml: a generic prompt,
calibrated). This command does better and leaves a file the user can read and edit: it scores a small
fixed set of candidates (instruction x template x label words, :func:`candidates`) on a seeded sample of the
folder's **validation** split (never test), prints each one's validation accuracy, and writes the best as
``<user config folder>/task/<name>.yaml`` (fedprompt.config.user_conf_dir: ``$FEDPROMPT_CONF_DIR``, else
``~/.config/fedprompt``). From then on ``task=<name>`` is that file, in every command (eval, run, deploy).

Every label-word set of one (instruction, template) pair is read off one forward pass: the model scores the
union of the sets' words at once, so the cost is one pass per (instruction, template), not per candidate.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fedprompt.errors import ConfigError, DataError

USAGE = ("fedprompt task init <folder> [name=<name>] [force=true] [key=value ...]: score a few prompts, templates "
         "and label words on <folder>'s validation split (limit=<n> examples, default 200; model=..., seed=...), "
         "print each one's accuracy and write the best to $FEDPROMPT_CONF_DIR/task/<name>.yaml (else "
         "~/.config/fedprompt/task/<name>.yaml); then `fedprompt eval task=<name>`. See docs/tasks.md")
DEFAULT_LIMIT = 200

# Instructions: {labels} is "a, b, c", {labels_or} "a, b or c". The first of each list is the fallback's.
PROMPTS = ("Classify the text as one of: {labels}.", "Is this text {labels_or}?",
           "Which of these best describes the text: {labels}?")
PAIR_PROMPTS = ("Classify the relation between the two texts as one of: {labels}.",
                "Read the two texts. Answer {labels_or}.",
                "Which of these best describes the two texts: {labels}?")
# (template, answer prefix): the instruction before the text (the fallback's) or after it, nearer the answer.
TEMPLATES = (("{prompt}\n\nText: {text}", "Answer:"), ("Text: {text}\n\n{prompt}", "Answer:"))
PAIR_TEMPLATES = (("{prompt}\n\nText 1: {text}\nText 2: {text_pair}", "Answer:"),
                  ("Text 1: {text}\nText 2: {text_pair}\n\n{prompt}", "Answer:"))


@dataclass
class Candidate:
    prompt: str
    template: str
    answer_prefix: str
    label_words: tuple[str, ...]
    accuracy: float = 0.0  # on the validation sample, with the task's calibration
    uncalibrated_accuracy: float = 0.0

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "template": self.template, "answer_prefix": self.answer_prefix,
                "label_words": list(self.label_words), "accuracy": round(self.accuracy, 4),
                "uncalibrated_accuracy": round(self.uncalibrated_accuracy, 4)}


def label_word_sets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """The label names as words (underscores as spaces, a leading space), as given and with the first letter's
    case flipped (" negative" / " Negative"): a small model often prefers one casing after "Answer:"."""
    base = [n.replace("_", " ").strip() for n in names]
    flipped = [b[:1].lower() + b[1:] if b[:1].isupper() else b[:1].upper() + b[1:] for b in base]
    sets = [tuple(" " + b for b in base), tuple(" " + f for f in flipped)]
    return [s for i, s in enumerate(sets) if s not in sets[:i] and len(set(s)) == len(s)]


def fill_labels(prompt: str, names: Sequence[str]) -> str:
    text = [n.replace("_", " ").strip() for n in names]
    return prompt.format(labels=", ".join(text), labels_or=", ".join(text[:-1]) + " or " + text[-1])


def candidates(names: Sequence[str], is_pair: bool) -> list[Candidate]:
    prompts, templates = (PAIR_PROMPTS, PAIR_TEMPLATES) if is_pair else (PROMPTS, TEMPLATES)
    return [Candidate(fill_labels(p, names), t, a, words)
            for p in prompts for t, a in templates for words in label_word_sets(names)]


def split_args(args: Sequence[str]) -> tuple[Path, str | None, bool, list[str]]:
    """``init <folder> [name=] [force=] [overrides]`` -> (folder, name, force, overrides)."""
    if not args or args[0] != "init":
        raise ConfigError(f"usage: {USAGE}")
    if len(args) < 2 or "=" in args[1]:
        raise ConfigError(f"usage: {USAGE}")
    folder, name, force, rest = Path(args[1]).expanduser(), None, False, []
    for item in args[2:]:
        key, _, value = item.partition("=")
        if key == "name":
            name = value
        elif key == "force":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"force must be true or false, got {value!r}")
            force = value.lower() == "true"
        else:
            rest.append(item)
    return folder, name, force, rest


def first_row_is_pair(folder: Path) -> bool:
    """Whether the folder's rows carry a ``text_pair`` (read off validation.jsonl's first row)."""
    path = folder / "validation.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing; task init chooses its prompt on the validation split (never test), so the "
                        "folder needs validation.jsonl (e.g. 10% of train, drawn with a seed)")
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    return isinstance(json.loads(line).get("text_pair"), str)
                except (json.JSONDecodeError, AttributeError):
                    return False  # the full read that follows names the bad line
    return False


def destination(name: str, force: bool) -> Path:
    """``<user config folder>/task/<name>.yaml``. Refused: a name of a shipped task (Hydra reads conf/'s file
    first, so the new one would never be used), and an existing file unless ``force=true``."""
    from fedprompt.config import CONF_ENV, PACKAGE_CONF, check_writable_dir, user_conf_path

    if (PACKAGE_CONF / "task" / f"{name}.yaml").is_file():
        raise ConfigError(f"name={name!r} is a task of conf/task already; give this one another name (name=<name>)")
    path = user_conf_path() / "task" / f"{name}.yaml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; force=true overwrites it (or choose name=<other>)")
    check_writable_dir(path.parent, CONF_ENV)
    return path


def validation_sample(validation: Sequence, limit: int, seed: int) -> list:
    """``limit`` rows drawn with ``seed`` (a file may be sorted by label), kept in file order."""
    order = np.random.default_rng(seed).permutation(len(validation))
    return [validation[i] for i in sorted(order[:limit])]


def prepare(args: Sequence[str]):
    """Everything checked before the model loads: (config, task data, destination, validation sample,
    calibration rows, calibration settings)."""
    from omegaconf import open_dict

    from fedprompt.config import (
        CONF_ENV,
        check_writable_dir,
        compose,
        load_task_checked,
        make_dir,
        user_conf_path,
        validate_common,
    )
    from fedprompt.data.loading import check_task_name
    from fedprompt.models.calibration import CalibrationSettings, calibration_examples

    folder, name, force, overrides = split_args(args)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give the folder that holds {{train,validation,test}}.jsonl and "
                        "meta.json")
    folder = folder.resolve()
    name = name or folder.name
    check_task_name(name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"name={name!r}: a task name is letters, digits, '_', '-' or '.' (it names a file and "
                          "is typed as task=<name>); give name=<name>")
    if any(o.partition("=")[0].lstrip("+") in ("task", "task.name", "task.path") for o in overrides):
        raise ConfigError("task init names the task itself: give the folder and name=<name>, not task=/task.path=")
    check_writable_dir(user_conf_path(), CONF_ENV)
    make_dir(user_conf_path(), CONF_ENV)  # where the config goes; compose refuses a $FEDPROMPT_CONF_DIR that is missing
    cfg = compose(["task=custom", f"task.name={name}", *overrides])
    with open_dict(cfg):
        cfg.task.path = str(folder)  # set here, not as an override: a path may hold what Hydra's grammar would parse
        if not any(o.partition("=")[0] == "task.is_pair" for o in overrides):
            cfg.task.is_pair = first_row_is_pair(folder)
        if cfg.task.is_pair and "{text_pair}" not in str(cfg.task.template):  # the fallback's shows one text
            cfg.task.template = PAIR_TEMPLATES[0][0]
    validate_common(cfg)
    if str(cfg.service.kind) != "inprocess":
        raise ConfigError(f"task init scores its candidates with the model loaded here (model=...), not through "
                          f"service.kind={cfg.service.kind}; drop service.* (fedprompt eval honours it)")
    path = destination(name, force)
    calibration = CalibrationSettings.from_task(cfg.task)
    task = load_task_checked(cfg)
    validation = task.split("validation")  # reads and checks every row before the model loads
    sample = validation_sample(validation, DEFAULT_LIMIT if cfg.limit is None else int(cfg.limit), int(cfg.seed))
    calib = calibration_examples(task.split("train") if calibration.enabled else [], calibration,
                                 task.spec.num_labels, int(cfg.seed))
    return cfg, task, path, sample, calib, calibration


def score_candidates(model, tokenizer, spec, found: list[Candidate], sample, calib, batch_size: int = 16,
                     progress: bool = False) -> None:
    """Fill each candidate's accuracies: one scoring pass per (instruction, template) over the union of the
    label-word sets, on the validation sample and on the calibration rows."""
    from dataclasses import replace

    from fedprompt.models import score_label_words
    from fedprompt.models.calibration import apply_bias, mean_bias
    from fedprompt.ties import pick_labels

    union = list(dict.fromkeys(w for c in found for w in c.label_words))
    gold = np.array([e.label for e in sample])
    groups: dict[tuple[str, str, str], list[Candidate]] = {}
    for c in found:
        groups.setdefault((c.prompt, c.template, c.answer_prefix), []).append(c)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * (len(sample) + len(calib)), desc="task init", unit="ex", dynamic_ncols=True)
    try:
        for (prompt, template, answer), group in groups.items():
            shown = replace(spec, template=template, answer_prefix=answer)  # scored on the union of words below
            inputs = [shown.format(e, prompt) for e in sample]
            scores = score_label_words(model, tokenizer, inputs, union, batch_size,
                                       progress=bar.update if bar else None)
            calib_scores = score_label_words(model, tokenizer, [shown.format(e, prompt) for e in calib], union,
                                             batch_size, progress=bar.update if bar else None) if calib else None
            for c in group:
                cols = [union.index(w) for w in c.label_words]
                raw = scores[:, cols]
                c.uncalibrated_accuracy = float((pick_labels(raw, inputs)[0] == gold).mean())
                bias = None if calib_scores is None else mean_bias(calib_scores[:, cols], [e.label for e in calib])
                c.accuracy = float((pick_labels(apply_bias(raw, bias), inputs)[0] == gold).mean())
    finally:
        if bar is not None:
            bar.close()


def table(found: list[Candidate], best: Candidate, calibrated: bool) -> str:
    """The candidates one a line, the chosen one marked with *."""
    head = "  val_acc  uncal  prompt | template | label words" if calibrated else "  val_acc  prompt | template | label words"
    lines = [head]
    for c in found:
        mark = "*" if c is best else " "
        uncal = f"  {c.uncalibrated_accuracy:.3f}" if calibrated else ""
        lines.append(f"{mark} {c.accuracy:.3f}{uncal}  {c.prompt!r} | {c.template!r} + {c.answer_prefix!r} | "
                     f"{list(c.label_words)}")
    return "\n".join(lines)


def write_config(path: Path, cfg, best: Candidate, n: int, majority: float, calibration) -> None:
    """The task's yaml: the chosen candidate, the folder, the calibration, and a header saying where it came
    from (model, validation sample, accuracy). Labels stay null (meta.json) unless task.labels renamed them."""
    from omegaconf import OmegaConf

    from fedprompt.config import make_dir

    node = {"name": str(cfg.task.name), "labels": OmegaConf.to_container(cfg.task.labels) if cfg.task.labels else None,
            "label_words": list(best.label_words), "template": best.template, "answer_prefix": best.answer_prefix,
            "manual_prompt": best.prompt, "is_pair": bool(cfg.task.is_pair), "path": str(cfg.task.path), "hf": None,
            "calibration": calibration.method, "calibration_examples": calibration.examples}
    header = (f"# Written by `fedprompt task init` on {time.strftime('%Y-%m-%d')} with model={cfg.model.name}: the best\n"
              f"# of its candidates on {n} validation examples (seed {cfg.seed}), accuracy {best.accuracy:.3f}"
              f"{' calibrated' if calibration.enabled else ''} (majority class {majority:.3f}).\n"
              f"# Edit freely; `fedprompt eval task={cfg.task.name} split=test` scores it on test (docs/tasks.md).\n")
    make_dir(path.parent, "FEDPROMPT_CONF_DIR")
    # One key a line, values as JSON (valid YAML): a template's newlines stay "\n", as in conf/task/*.yaml.
    path.write_text(header + "".join(f"{key}: {json.dumps(value)}\n" for key, value in node.items()))


def cmd_task(args: Sequence[str]) -> dict:
    """``fedprompt task init <folder> ...``; returns the JSON record (the chosen config and every candidate)."""
    from fedprompt.models.calibration import majority_rate

    cfg, task, path, sample, calib, calibration = prepare(args)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    found = candidates(spec.labels, spec.is_pair)
    start = time.perf_counter()
    from fedprompt.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(cfg.model.name))
    model = load_causal_lm(str(cfg.model.name), cfg.model.get("device"), cfg.model.get("dtype"))
    score_candidates(model, tokenizer, spec, found, sample, calib, int(cfg.batch_size), bool(cfg.progress))
    best = max(found, key=lambda c: c.accuracy)  # max keeps the first of equals: the simpler, earlier candidate
    majority = majority_rate([e.label for e in sample])
    print(f"fedprompt task init: {len(found)} candidates on {len(sample)} validation examples of {task.source} "
          f"(majority class {majority:.3f}; calibration {calibration.method}):\n{table(found, best, calibration.enabled)}",
          file=sys.stderr)
    write_config(path, cfg, best, len(sample), majority, calibration)
    print(f"fedprompt task init: wrote {path}; next: fedprompt eval task={spec.name} split=test", file=sys.stderr)
    return {"task": spec.name, "config": str(path), "data": task.source, "model": str(cfg.model.name),
            "split": "validation", "n": len(sample), "majority_accuracy": majority,
            "calibration": calibration.method, "chosen": best.to_dict(), "candidates": [c.to_dict() for c in found],
            "seconds": round(time.perf_counter() - start, 2)}
