"""``fedprompt distill`` and ``fedprompt transfer``: POST's two steps around the federated tuning.

Both check their input first (config values, the teacher's depth, data folders, label words, the prompt
file, its width and whether it fits the large model's context, a student with the large model's tokenizer,
vocabulary and hidden size, a non-empty public set, and that no text they learn or choose from is in the
evaluation examples, by content: fedprompt.data.leakage) and only then load models. Each writes its run
folder (``outputs/<command>/...`` or ``output_dir=``): result.json (also the returned record), config.yaml,
and distill's loss curve or transfer's prompt.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Set
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedprompt.config import compose, load_task_checked, output_dir, validate_common
from fedprompt.data import Example, load_task
from fedprompt.data.dataset import TaskData
from fedprompt.data.leakage import check_disjoint, content_key, without
from fedprompt.errors import ConfigError, DataError
from fedprompt.typed_config import plain_dict


def _task_examples(name: str, split: str, data_dir) -> list[Example]:
    """The rows of task folder ``name`` (no conf/task file needed: only the text and labels are read)."""
    return load_task({"name": name}, data_dir).split(split)


def distill_tasks(data, data_dir) -> dict[str, TaskData]:
    """The tasks of ``data.tasks`` as distill reads them: ``raw`` needs only a folder, ``task`` the task's conf."""
    if data.format == "raw":
        return {name: load_task({"name": name}, data_dir) for name in data.tasks}
    return {name: load_task(plain_dict(compose([f"task={name}"]).task), data_dir)
            for name in data.tasks}


def distill_texts(data, data_dir, chat_format: str | None, seed: int,
                  tasks: dict[str, TaskData] | None = None) -> list[str]:
    """The unlabeled texts of ``data.tasks`` (a DistillDataConfig), shuffled with ``seed``, at most ``max_texts``.

    ``format: task``: each example as the model sees a prompt of its own task (that task's template, manual
    prompt and answer prefix in the model's chat format); ``raw``: the text alone (pair tasks: both sides).
    ``tasks``: those of :func:`distill_tasks`, already read (and checked).
    """
    texts = []
    for task in (tasks or distill_tasks(data, data_dir)).values():
        if data.format == "raw":
            texts += [" ".join(filter(None, (e.text, e.text_pair))) for e in task.split(data.split)]
            continue
        spec = task.spec.with_chat_format(chat_format)
        texts += [spec.format(e) for e in task.split(data.split)]
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


def _text_config(config):
    """The part of a model config that describes the language model (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def check_not_tuned_task(data, tuned: str) -> None:
    """Refuse distillation text (``data``: a DistillDataConfig) from the task the student is for (``task=``): its
    train split is the clients' data."""
    if tuned in data.tasks:
        raise ConfigError(f"distill.data.tasks {list(data.tasks)} includes {tuned}, the task this student is for "
                          f"(task={tuned}): its train text is the clients' private data; list other tasks, e.g. "
                          f"distill.data.tasks=[{','.join(data.other_tasks(tuned))}]")


def _write(out: Path, cfg: DictConfig, record: dict) -> dict:
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return record


def cmd_distill(cfg: DictConfig) -> dict:
    from transformers import AutoConfig

    from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer, materialize
    from fedprompt.models.distill import (
        DistillCheckpoint,
        DistillConfig,
        build_student,
        check_layers,
        default_layers,
        default_student_dir,
        distill,
        distill_settings,
        loss_curve_plot,
        save_student,
    )
    from fedprompt.models.teacher_cache import build_teacher_cache, cache_key
    from fedprompt.typed_config import from_node

    validate_common(cfg)
    dcfg = from_node(DistillConfig, cfg.distill, "distill")
    check_not_tuned_task(dcfg.data, str(cfg.task.name))
    teacher_name = str(cfg.model.name)
    depth = int(AutoConfig.from_pretrained(materialize(teacher_name)).num_hidden_layers)
    layers = check_layers(default_layers(depth) if dcfg.layers is None else dcfg.layers, depth)
    task = load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    examples = task.split(str(cfg.split))[: dcfg.eval_limit]
    # The student learns from the distillation text and is then scored on `examples`: no sentence may be in both
    # (checked on the Examples, whose text and text_pair are the content; formatting only adds the template).
    # Always refused, never excluded: a run re-checks the student's text against its own evaluation split.
    sources = distill_tasks(dcfg.data, cfg.get("data_dir"))
    split = dcfg.data.split
    check_disjoint({f"the distillation text ({name} {split})": t.split(split) for name, t in sources.items()},
                   f"{spec.name} {cfg.split}", examples, remedy="or distil on other tasks (distill.data.tasks)")
    texts = distill_texts(dcfg.data, cfg.get("data_dir"), cfg.model.get("chat_format"), dcfg.seed, sources)
    student_dir = Path(dcfg.output).expanduser() if dcfg.output else default_student_dir(teacher_name)
    out = output_dir(cfg, "distill")

    device, dtype = cfg.model.get("device"), cfg.model.get("dtype")
    tokenizer = load_tokenizer(teacher_name)
    # Whole texts only: a cut-off prompt would lose its answer position, the one the student is used at.
    lengths = tokenizer(texts, add_special_tokens=True)["input_ids"]
    texts = [t for t, ids in zip(texts, lengths) if len(ids) <= dcfg.max_length][: dcfg.data.max_texts]
    if not texts:
        raise ConfigError(f"no text of {dcfg.data.tasks} fits in distill.max_length={dcfg.max_length} tokens; raise it")
    # Checkpoints resume only the same distillation: refused here, before any model loads, if it is another one.
    checkpoint = DistillCheckpoint(student_dir, dcfg.checkpoint_every, distill_settings(
        dcfg, texts, teacher=teacher_name, teacher_dtype=str(dtype), layers=layers))
    checkpoint.check()
    teacher = load_causal_lm(teacher_name, device, dtype)
    student = build_student(teacher, layers).to(next(teacher.parameters()).device)
    show = bool(cfg.get("progress", True))
    cache, cache_info = None, None
    if dcfg.teacher_cache.enabled:
        tc = dcfg.teacher_cache
        root = Path(tc.dir).expanduser() if tc.dir else student_dir.with_name(student_dir.name + ".teacher_cache")
        key = cache_key(teacher_name, str(teacher.dtype).removeprefix("torch."), texts, dcfg.max_length, tc.top_k,
                        dcfg.loss.temperature, dcfg.loss.a_cos > 0, tc.hidden_dtype)
        cache, cache_info = build_teacher_cache(
            teacher, tokenizer, texts, root, key, tc.batch_size or dcfg.batch_size,
            progress=(lambda done, total: print(f"teacher cache: {done}/{total} texts", flush=True)) if show else None)
    report = distill(teacher, student, tokenizer, texts, dcfg, cache=cache, checkpoint=checkpoint,
                     progress=(lambda step, row: print(f"distill step {step}: {row}", flush=True)) if show else None)
    # What the student learnt from, in its own config too (`fedprompt run` refuses it for a task it read the train text of).
    student.config.fedprompt_student = {**student.config.fedprompt_student,
                                        "distill_data": {"tasks": list(dcfg.data.tasks), "split": split}}
    save_student(student, tokenizer, student_dir)
    checkpoint.remove()  # the student is saved: the checkpoint has done its job
    loss_curve_plot(report.curve, out / "loss_curve.png")
    del student
    reloaded = load_causal_lm(str(student_dir), device, dtype)  # the saved student is what users load
    accuracy = {name: PromptedClassifier(m, tokenizer, spec, int(cfg.batch_size)).evaluate(examples).accuracy
                for name, m in (("teacher", teacher), ("student", reloaded))}
    last = report.curve[-1] if report.curve else {}
    record = {
        "student": str(student_dir), "teacher": teacher_name, "layers": layers, "teacher_layers": depth,
        "student_parameters": report.student_parameters, "teacher_parameters": report.teacher_parameters,
        "trainable_parameters": report.trainable_parameters, "steps": report.steps, "texts": report.texts,
        "tokens": report.tokens, "distill_s": report.seconds, "final_loss": last.get("loss"),
        "final_parts": {k: last[k] for k in ("kl", "lm", "cos", "answer") if k in last}, "data_tasks": list(dcfg.data.tasks),
        # What the student learnt from, as read (task conf or folder alone): `fedprompt run` re-checks it.
        "data_split": split, "data_sources": {name: dict(t.task_cfg) for name, t in sources.items()},
        "zero_shot_task": spec.name, "zero_shot_split": str(cfg.split), "zero_shot_n": len(examples),
        "teacher_zero_shot_accuracy": accuracy["teacher"], "student_zero_shot_accuracy": accuracy["student"],
        "manual_prompt": spec.manual_prompt, "loss_curve": str(out / "loss_curve.png"), "output_dir": str(out),
        "teacher_cache": cache_info and {**cache_info, "top_k": dcfg.teacher_cache.top_k},
        "resumed_from_step": report.resumed_from,
    }
    (student_dir / "distill_report.json").write_text(json.dumps({**record, "curve": report.curve}, indent=2) + "\n")
    return _write(out, cfg, record)


def public_examples(tcfg, task_name: str, data_dir, seed: int,
                    exclude: Set[bytes] = frozenset()) -> tuple[list[Example], str, str]:
    """The public transfer set (labels present in the files but never used) and where it came from; rows whose
    content is in ``exclude`` are dropped before sampling."""
    public_task, split = tcfg.public_source(task_name)
    rows = without(_task_examples(public_task, split, data_dir), exclude)
    order = np.random.default_rng(seed).permutation(len(rows))[: tcfg.public_size]
    return [rows[i] for i in order], public_task, split


def transfer_prompt(student_tuner, large_tuner, student_prompt, init_prompt, public: list[Example], tcfg,
                    alpha_examples: list[Example], chance: float, batch_size: int, seed: int = 0,
                    zero_shot: float | None = None) -> dict:
    """POST's transfer with alpha from ``tcfg.alpha`` or the rule (ZS, C measured on ``alpha_examples``;
    ``zero_shot`` reuses an earlier ZS on the same examples).

    Returns the :class:`TransferResult` under ``"result"`` and the alpha inputs beside it.
    """
    from fedprompt.methods.post.transfer import PromptTransfer, alpha_rule
    from fedprompt.models import PromptedClassifier

    info: dict = {"alpha_given": tcfg.alpha}
    start = time.perf_counter()
    if tcfg.alpha is None:
        def accuracy(tuner, prompt) -> float:
            return PromptedClassifier(tuner.model, tuner.tokenizer, tuner.spec, batch_size).evaluate(
                alpha_examples, soft_prompt=prompt).accuracy

        info["zero_shot_accuracy"] = accuracy(large_tuner, None) if zero_shot is None else zero_shot
        info["student_prompt_accuracy"] = accuracy(student_tuner, student_prompt.to(student_tuner.device))
        info["chance"] = chance
        alpha = alpha_rule(info["zero_shot_accuracy"], info["student_prompt_accuracy"], chance)
        # POST's rule at its cap, not a refusal (alpha_rule says why); said once, and kept in the record.
        info["alpha_capped_at_chance"] = info["student_prompt_accuracy"] <= chance
        if info["alpha_capped_at_chance"]:
            print(f"fedprompt transfer: note: the student's prompt scores {info['student_prompt_accuracy']:.3f} on "
                  f"the alpha set, no better than chance ({chance:.3f}): alpha = 1 (POST's rule at its cap), so the "
                  "loss is the KL of the logit differences alone", file=sys.stderr, flush=True)
    else:
        alpha = float(tcfg.alpha)
    info["alpha_s"] = round(time.perf_counter() - start, 3)
    transfer = PromptTransfer(student_tuner, large_tuner, steps=tcfg.steps, batch_size=tcfg.batch_size, lr=tcfg.lr,
                              temperature=tcfg.temperature, logits=tcfg.logits)
    info["result"] = transfer.run(student_prompt, public, alpha, init_prompt, seed=seed)
    return info


def cmd_transfer(cfg: DictConfig) -> dict:
    from transformers import AutoConfig

    from fedprompt.methods.post import PromptConfig, SoftPromptTuner, TrainConfig, TransferConfig, initial_prompt
    from fedprompt.methods.post.prompts import load_prompt, save_prompt
    from fedprompt.methods.post.tuning import check_prompt_fits, label_token_ids
    from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer, materialize
    from fedprompt.models.distill import resolve_model

    validate_common(cfg)
    tcfg = TransferConfig.from_dict(cfg.transfer)
    if not tcfg.prompt:
        raise ConfigError("transfer.prompt is required: the student's prompt file, e.g. "
                          "transfer.prompt=outputs/run/<run>/prompt.safetensors from `fedprompt run method=post`")
    student_prompt, meta = load_prompt(tcfg.prompt)
    large_name = str(cfg.model.name)
    student_name = resolve_model(tcfg.student, large_name)
    large_cfg = _text_config(AutoConfig.from_pretrained(materialize(large_name)))
    student_cfg = _text_config(AutoConfig.from_pretrained(materialize(student_name)))
    hidden = int(large_cfg.hidden_size)
    if student_prompt.weight.shape[1] != hidden:
        raise ConfigError(f"the prompt in {tcfg.prompt} has width {student_prompt.weight.shape[1]} but {large_name} has "
                          f"hidden size {hidden}: transfer needs a student distilled from this model")
    for key in ("vocab_size", "hidden_size"):
        theirs, ours = getattr(student_cfg, key, None), getattr(large_cfg, key, None)
        if theirs != ours:
            raise ConfigError(f"the student {student_name} has {key} {theirs} but {large_name} has {ours}: "
                              "a student must be distilled from the large model (same tokenizer and vocabulary)")
    task = load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    examples = task.split(str(cfg.split))
    examples = examples if cfg.limit is None else examples[: int(cfg.limit)]
    # The prompt is fitted on the public set and alpha chosen on the alpha set, then scored on `examples`: none of
    # their sentences may be in it. eval_overlap=exclude drops those rows before sampling; the default refuses.
    exclude = {content_key(e) for e in examples} if cfg.federation.get("eval_overlap") == "exclude" else set()
    public, public_task, public_split = public_examples(tcfg, spec.name, cfg.get("data_dir"), int(cfg.seed), exclude)
    alpha_examples = without(task.split(tcfg.alpha_split), exclude)[: tcfg.alpha_limit] if tcfg.alpha is None else []
    check_disjoint({f"the transfer's public set ({public_task} {public_split})": public,
                    f"the alpha set ({spec.name} {tcfg.alpha_split})": alpha_examples},
                   f"{spec.name} {cfg.split}", examples)
    if not public:
        raise DataError(f"the public transfer set ({public_task} {public_split}) is empty: point "
                        "transfer.public_task / transfer.public_split at a split with rows (transfer.public_size >= 1)")
    if tcfg.alpha is None and not alpha_examples:
        raise DataError(f"the alpha set ({spec.name} {tcfg.alpha_split}) is empty: POST's rule needs labelled "
                        "examples; set transfer.alpha_split to a split with rows or give transfer.alpha")
    tokenizer = load_tokenizer(large_name)
    student_tokenizer = load_tokenizer(student_name)
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the student {student_name} has another tokenizer than {large_name} "
                          f"({len(student_tokenizer)} vs {len(tokenizer)} tokens): a student must be distilled from the "
                          "large model (same tokenizer)")
    label_token_ids(tokenizer, spec.label_words)
    longest = max(len(ids) for ids in tokenizer([spec.format(e) for e in [*public, *examples]],
                                                add_special_tokens=True)["input_ids"])
    check_prompt_fits(student_prompt.num_tokens, longest, getattr(large_cfg, "max_position_embeddings", None),
                      remedy=f"the prompt in {tcfg.prompt} is too long for {large_name}, or the inputs are")
    out = output_dir(cfg, "transfer")

    device, dtype = cfg.model.get("device"), cfg.model.get("dtype")
    train = TrainConfig(batch_size=tcfg.batch_size, lr=tcfg.lr)
    large = SoftPromptTuner(load_causal_lm(large_name, device, dtype), tokenizer, spec, train)
    student = SoftPromptTuner(load_causal_lm(student_name, device, dtype), student_tokenizer, spec, train)
    if tcfg.init == "student":
        init = load_prompt(tcfg.prompt)[0]
    else:
        init = initial_prompt(PromptConfig(num_tokens=student_prompt.num_tokens), spec, tokenizer, large.model)
    info = transfer_prompt(student, large, student_prompt, init, public, tcfg, alpha_examples,
                           chance=1.0 / spec.num_labels, batch_size=int(cfg.batch_size), seed=int(cfg.seed))
    result = info.pop("result")
    evaluation = PromptedClassifier(large.model, tokenizer, spec, int(cfg.batch_size)).evaluate(
        examples, soft_prompt=result.prompt)
    path = save_prompt(result.prompt, out / "prompt.safetensors", task=spec.name, model=large_name,
                       transferred_from=str(tcfg.prompt), alpha=result.alpha)
    record = {
        "accuracy": evaluation.accuracy, "n": evaluation.n, "task": spec.name, "split": str(cfg.split),
        "model": large_name, "student": student_name, "alpha": result.alpha, **info,
        "public_task": public_task, "public_split": public_split, "public_n": len(public), "steps": result.steps,
        "transfer_s": round(result.seconds, 3), "precompute_s": round(result.precompute_seconds, 3),
        "final_loss": result.losses[-1] if result.losses else None, "losses": result.losses,
        "prompt_tokens": result.prompt.num_tokens, "source_prompt": str(tcfg.prompt), "source_meta": meta,
        "prompt_file": str(path), "manual_prompt": spec.manual_prompt, "eval_s": round(evaluation.seconds, 3),
        "output_dir": str(out), "transfer": asdict(tcfg),
    }
    return _write(out, cfg, record)
