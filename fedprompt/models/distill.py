"""A small student from a large causal LM: keep some of its layers, then distil (POST, Wang et al. 2025).

``build_student`` copies the teacher's config with fewer layers (``layers``: the teacher's layer indices
to keep, in order; default the first 2 and the last 2), then copies the kept layers' weights, the
embeddings, the final norm and the LM head. ``distill`` trains the student on unlabeled text with

    loss = a_ce * T^2 * KL(teacher_T || student_T)  +  a_lm * CE(next token)  +  a_cos * (1 - cos(h_s, h_t))
           [+ a_answer * T^2 * KL at each text's last token]

(POST's defaults a_ce=5, a_lm=2, a_cos=1, T=2; DistilBERT's three losses). KL and CE are averaged over the
real (non-padding) tokens, the cosine over the last hidden states (the LM head's input) of those tokens.
``a_answer`` (default 0, off in POST) weighs once more the KL at the last token, which in a task-formatted
text is the answer position: one token in ~50 of the plain average, and the only one classification reads.

With a :class:`~fedprompt.models.teacher_cache.TeacherCache` (``distill.teacher_cache``, offline distillation)
the teacher is not run at the steps: its top-k log-probabilities, tail mass and hidden states are read from disk
and the KL is the top-k + tail KL of :func:`~fedprompt.models.teacher_cache.topk_kl`. A
:class:`DistillCheckpoint` saves the training state every N steps and resumes it (same settings only).
``distill.loss_positions`` < 1 reads the KL and LM terms at a fraction of the positions, drawn per step
(:func:`loss_positions`), and the models compute their logits there only (``logits_to_keep``).

The embeddings and the (tied) LM head stay frozen by default: the student keeps the large model's
input space, so a soft prompt tuned on the student can be pasted onto, or initialise, the large
model's prompt, and the LM head's weight gradient (the largest matmul) is skipped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fedprompt.errors import ConfigError, DataError
from fedprompt.models.distill_config import (  # noqa: F401 (declared there; imported from here too)
    DistillConfig,
    DistillDataConfig,
    DistillLossWeights,
    TeacherCacheConfig,
)
from fedprompt.models.registry import fast_bf16
from fedprompt.models.scoring import position_ids_from_mask
from fedprompt.models.teacher_cache import CachedTargets, TeacherCache, texts_digest, topk_kl
from fedprompt.typed_config import flatten

_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def default_layers(num_layers: int, first: int = 2, last: int = 2) -> list[int]:
    """The first ``first`` and last ``last`` layers (POST's default student)."""
    return sorted(set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers)))


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """``layers`` as a list, or a ConfigError saying which index is wrong."""
    layers = [int(i) for i in layers]
    if not layers:
        raise ConfigError("distill.layers is empty; keep at least one layer, e.g. distill.layers=[0,1,28,29]")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"distill.layers {bad} out of range: the teacher has {num_layers} layers (0..{num_layers - 1})")
    if layers != sorted(set(layers)):
        raise ConfigError(f"distill.layers must be increasing without repeats (the teacher's order), got {layers}")
    return layers


def student_config(teacher_config, layers: Sequence[int]):
    """The teacher's config with only ``layers`` (per-layer settings such as ``layer_types`` subset)."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    return config


def build_student(teacher, layers: Sequence[int]):
    """A student with ``teacher``'s layers ``layers`` (renumbered 0..k-1), embeddings, norm and head, in fp32."""
    from transformers import AutoModelForCausalLM

    layers = check_layers(layers, teacher.config.num_hidden_layers)
    new_index = {old: new for new, old in enumerate(layers)}
    student = AutoModelForCausalLM.from_config(student_config(teacher.config, layers), dtype=torch.float32)
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match:
            old = int(match.group(2))
            if old not in new_index:
                continue
            key = f"{match.group(1)}{new_index[old]}{match.group(3)}"
        state[key] = value.detach().float()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied(student, k)]
    if missing or unexpected:
        raise ConfigError(f"cannot build a student of {type(teacher).__name__}: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]} (only decoders whose layers are named '*.layers.N.*' are supported)")
    student.config.fedprompt_student = {"layers": layers, "teacher_layers": teacher.config.num_hidden_layers}
    return student


def _is_tied(model, key: str) -> bool:
    # The LM head of a tied model shares the embedding matrix: it is not in the state dict on its own.
    return key.startswith("lm_head") and bool(getattr(model.config, "tie_word_embeddings", False))


def default_student_dir(teacher: str) -> Path:
    """Where ``fedprompt distill`` puts the student of ``teacher`` unless told otherwise."""
    from fedprompt.models.registry import cache_root

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(teacher)).name if Path(str(teacher)).is_dir() else str(teacher))
    return cache_root() / "students" / slug


def resolve_model(name: str, teacher: str) -> str:
    """``"student"``: the default student of ``teacher`` (it must exist); anything else: a model reference."""
    from fedprompt.models.registry import check_model_name

    if name != "student":
        check_model_name(name)
        return name
    folder = default_student_dir(teacher)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"no student of {teacher!r} at {folder}; build it first with `fedprompt distill model={teacher}` "
                          "or point to a student folder (method.model=<folder> / transfer.student=<folder>)")
    return str(folder)


def loss_positions(mask: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor | None:
    """The sorted sequence positions whose logits a step computes (``distill.loss_positions``): ``fraction`` of
    them drawn with ``generator`` and every row's last real token (its answer position); None (all) at 1."""
    if fraction >= 1:
        return None
    length = mask.shape[1]
    drawn = torch.randperm(length, generator=generator)[: max(1, math.ceil(fraction * length))]
    last = (mask.cpu() * torch.arange(length)).argmax(1)  # the last real position of each row, either padding side
    return torch.unique(torch.cat([drawn, last])).to(mask.device)


def distill_loss(student_out, teacher_out, input_ids: torch.Tensor, mask: torch.Tensor, w: DistillLossWeights,
                 cached: CachedTargets | None = None, keep: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch and its parts (floats, for the loss curve).

    ``cached`` (offline distillation): the teacher's top-k log-probabilities, tail mass and hidden states of the
    batch's real tokens from a :class:`~fedprompt.models.teacher_cache.TeacherCache`; ``teacher_out`` is then
    unused and the KL is :func:`~fedprompt.models.teacher_cache.topk_kl` (the exact KL when top_k is the vocabulary).
    ``keep`` (:func:`loss_positions`): the sequence positions the outputs' logits were computed at (the models'
    ``logits_to_keep``); the KL and LM terms read those, the cosine every real token. None: every position.
    """
    real = mask.bool()
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device) if keep is None else keep
    kept = real[:, positions]  # the real tokens among the positions that have logits
    s_logits = student_out.logits.float()[kept]  # (kept tokens, V)
    temp = w.temperature
    if cached is None:
        t_logits = teacher_out.logits.float()[kept]

        def kl_of(rows):
            return _softened_kl(s_logits[rows], t_logits[rows], temp)

        t_hidden = teacher_out.hidden_states[-1][real].float()
    else:
        logp, ids, log_tail = cached.logp, cached.ids, cached.log_tail
        if keep is not None:  # the cache holds every real token, flattened row by row: pick the kept ones
            flat = (real.flatten().cumsum(0) - 1).view_as(real)[:, positions][kept]
            logp, ids, log_tail = logp[flat], ids[flat], log_tail[flat]

        def kl_of(rows):
            return topk_kl(s_logits[rows], logp[rows], ids[rows], log_tail[rows], temp)

        t_hidden = cached.hidden
    kl = kl_of(slice(None))
    # Next-token targets: position t predicts token t+1 where both are real tokens.
    following = (positions + 1).clamp(max=length - 1)
    pairs = kept & real[:, following] & (positions + 1 < length)
    if pairs.any():
        lm = torch.nn.functional.cross_entropy(student_out.logits[pairs].float(), input_ids[:, following][pairs])
    else:  # only last tokens drawn: nothing to predict in this batch
        lm = s_logits.new_zeros(())
    total = w.a_ce * kl + w.a_lm * lm
    parts = {"kl": kl.item(), "lm": lm.item()}
    if t_hidden is not None:
        s_hidden = student_out.hidden_states[-1][real].float()
        cos = (1 - torch.nn.functional.cosine_similarity(s_hidden, t_hidden, dim=-1)).mean()
        total = total + w.a_cos * cos
        parts["cos"] = cos.item()
    elif w.a_cos:
        raise ConfigError("distill.loss.a_cos > 0 needs the teacher's hidden states, which this teacher cache lacks")
    if w.a_answer:
        # The last real token of each row (either padding side): where a task-formatted text's answer comes; in the
        # flattened real tokens, the last of each row's run.
        last = kept.sum(1).cumsum(0) - 1  # the last real token is always kept
        answer = kl_of(last)
        total = total + w.a_answer * answer
        parts["answer"] = answer.item()
    return total, {"loss": total.item(), **parts}


def _softened_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the rows (Hinton's scaling keeps gradients T-free)."""
    return torch.nn.functional.kl_div(torch.log_softmax(s_logits / temp, -1), torch.log_softmax(t_logits / temp, -1),
                                      log_target=True, reduction="batchmean") * temp**2


@dataclass
class DistillReport:
    """What ``distill`` did: sizes, time, and the loss curve (one row per logged step)."""

    layers: list[int]
    teacher_layers: int
    student_parameters: int
    teacher_parameters: int
    trainable_parameters: int
    steps: int
    texts: int
    tokens: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0  # the checkpoint's step this run started from (0: from the start)


CHECKPOINT_DIR = "distill_checkpoint"
# Settings that do not change what distillation computes: a rerun may change them and still resume.
_NOT_SETTINGS = {"output", "eval_limit", "checkpoint_every"}
_NOT_CACHE_SETTINGS = {"dir", "batch_size"}


def distill_settings(config: DistillConfig, texts: Sequence[str], **extra) -> dict:
    """What a distillation's result depends on (checkpoints resume only with the same): the config less its output
    and evaluation keys, the texts (a hash, in order) and ``extra`` (the teacher, the kept layers)."""
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_SETTINGS}
    settings["teacher_cache"] = {k: v for k, v in settings["teacher_cache"].items() if k not in _NOT_CACHE_SETTINGS}
    if not config.teacher_cache.enabled:
        settings["teacher_cache"] = {"enabled": False}
    if config.loss_positions == 1:
        del settings["loss_positions"]  # the default, as before it was a setting: older checkpoints still resume
    return {**settings, "texts": texts_digest(texts), "n_texts": len(texts), **extra}


class DistillCheckpoint:
    """``<folder>/distill_checkpoint``: the trainable student weights, optimizer, schedule, step, data order and
    RNG states every ``every`` steps (written whole to a temporary file, then renamed), with the settings."""

    def __init__(self, folder: Path, every: int, settings: dict):
        self.folder = Path(folder) / CHECKPOINT_DIR
        self.every = int(every)
        self.settings = json.loads(json.dumps(settings))  # as stored: lists, not tuples

    @property
    def state_path(self) -> Path:
        return self.folder / "state.pt"

    def check(self) -> int | None:
        """The step of a checkpoint made with these settings (None: none); a ConfigError for other settings."""
        path = self.folder / "settings.json"
        if not (path.is_file() and self.state_path.is_file()):
            return None
        saved = json.loads(path.read_text())
        if saved["settings"] != self.settings:
            old, new = flatten(saved["settings"]), flatten(self.settings)
            keys = sorted(set(old) | set(new), key=lambda k: (k not in old or k not in new, k))  # changed values first
            diff = [f"{k} {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys if old.get(k) != new.get(k)]
            raise ConfigError(f"{self.folder.parent} holds a distillation checkpoint (step {saved['step']}) made with other "
                              f"settings ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): rerun with those settings "
                              f"to resume, or delete {self.folder} (or set another distill.output) to start over")
        return int(saved["step"])

    def load(self) -> dict | None:
        if self.check() is None:
            return None
        return torch.load(self.state_path, map_location="cpu", weights_only=False)

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        (self.folder / "settings.tmp").write_text(json.dumps({"step": state["step"], "settings": self.settings}))
        os.replace(tmp, self.state_path)
        os.replace(self.folder / "settings.tmp", self.folder / "settings.json")

    def remove(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)


def distill(teacher, student, tokenizer, texts: Sequence[str], config: DistillConfig, log_every: int = 10,
            progress: Callable[[int, dict], None] | None = None, cache: TeacherCache | None = None,
            checkpoint: DistillCheckpoint | None = None) -> DistillReport:
    """Train ``student`` (in place) to imitate ``teacher`` on ``texts``; cycles over them in seeded order.

    ``cache``: read the teacher's outputs from it (offline; ``teacher`` is then not run and may be None).
    ``checkpoint``: save to it every ``checkpoint.every`` steps, and start from it if it holds a step.
    """
    if not texts:
        raise DataError("no text to distil on; check distill.data (its tasks' splits are empty?)")
    if cache is not None and abs(cache.temperature - config.loss.temperature) > 1e-12:
        raise ConfigError(f"the teacher cache holds probabilities at T={cache.temperature}, the loss uses "
                          f"T={config.loss.temperature}; build the cache at the loss's temperature")
    steps, batch_size = config.steps, config.batch_size
    device = next(student.parameters()).device
    autocast = fast_bf16(device.type) if config.autocast is None else bool(config.autocast)
    if teacher is not None:
        teacher.eval()
    student.train()
    for param in student.parameters():
        param.requires_grad_(config.train_embeddings or not _is_embedding(student, param))
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    curve, window, tokens, first, elapsed = [], [], 0, 0, 0.0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        unexpected = student.load_state_dict(state["student"], strict=False).unexpected_keys
        if unexpected or set(state["student"]) != {n for n, p in student.named_parameters() if p.requires_grad}:
            raise ConfigError(f"the checkpoint in {checkpoint.folder} does not fit this student; delete it to start over")
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        order, curve, window, tokens = list(state["order"]), list(state["curve"]), list(state["window"]), int(state["tokens"])
        first, elapsed = int(state["step"]), float(state["seconds"])
    start = time.perf_counter() - elapsed
    for step in range(first, steps):
        if len(order) < batch_size:
            order += torch.randperm(len(texts), generator=generator).tolist()
        batch = [texts[i] for i in order[:batch_size]]
        del order[:batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=config.max_length).to(device)
        kwargs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True,
                      position_ids=position_ids_from_mask(enc.attention_mask), use_cache=False)
        keep = loss_positions(enc.attention_mask, config.loss_positions, generator)
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        if cache is None:
            with torch.no_grad():
                teacher_out = teacher(**kwargs)
            targets = None
        else:
            teacher_out = None
            targets = cache.targets(batch, enc.attention_mask.sum(1).tolist(), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            student_out = student(**kwargs)
        loss, parts = distill_loss(student_out, teacher_out, enc.input_ids, enc.attention_mask, config.loss, targets,
                                   keep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        tokens += int(enc.attention_mask.sum())
        window.append(parts)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, **{k: sum(p[k] for p in window) / len(window) for k in parts},
                   "seconds": round(time.perf_counter() - start, 2)}
            curve.append(row)
            window = []
            if progress is not None:
                progress(step + 1, row)
        if checkpoint is not None and checkpoint.every and (step + 1) % checkpoint.every == 0 and step + 1 < steps:
            checkpoint.save({
                "step": step + 1, "student": {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "order": order,
                "curve": curve, "window": window, "tokens": tokens, "seconds": time.perf_counter() - start})
    student.eval()
    student.requires_grad_(False)
    info = student.config.fedprompt_student
    return DistillReport(
        layers=list(info["layers"]), teacher_layers=int(info["teacher_layers"]),
        student_parameters=_count(student), teacher_parameters=_count(teacher) if teacher is not None else 0,
        trainable_parameters=sum(p.numel() for p in trainable), steps=steps, texts=len(texts), tokens=tokens,
        seconds=round(time.perf_counter() - start, 2), curve=curve, resumed_from=first,
    )


def _is_embedding(model, param) -> bool:
    head = model.get_output_embeddings()
    return param is model.get_input_embeddings().weight or (head is not None and param is head.weight)


def _count(model) -> int:
    # Tied weights are one tensor: count each parameter once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_student(student, tokenizer, folder: Path) -> Path:
    """Save a student that ``load_causal_lm(str(folder))`` loads like any model folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def loss_curve_plot(curve: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    steps = [r["step"] for r in curve]
    for key in ("loss", "kl", "lm", "cos"):
        if not all(key in r for r in curve):
            continue
        ax.plot(steps, [r[key] for r in curve], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted total and its parts)")
    ax.set_yscale("log")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
