"""Offline distillation: the teacher's outputs on the distillation text, computed once and read from disk.

Online distillation runs the teacher forward beside the student at every step (SmolLM2-135M's 30 layers next
to a 4-layer student: most of a step's time). The teacher's outputs on a fixed text do not change, so
:func:`build_teacher_cache` runs the teacher once over all the texts (in batches, shortest first) and keeps,
for every real token of every text:

- the ``top_k`` largest next-token log-probabilities at temperature T, ``log p_T(i)``, and their token ids;
- the log of the tail mass, ``log(1 - sum_{i in top-k} p_T(i))`` (``-inf`` when k is the vocabulary);
- when the cosine term is on (``a_cos > 0``), the last hidden state (the LM head's input), in float16 by
  default (``hidden_dtype``): 4,000 texts x ~70 tokens x 576 dims take ~320 MB in float16, twice in float32.

Sizes: ``top_k`` log-probabilities in float32 and ids in uint16 (int32 for vocabularies over 65,535), i.e.
6 bytes x k a token: 128 x 6 x 280k tokens ~ 215 MB for SmolLM2's 4,000 default texts.

The folder is keyed by a hash of everything the values depend on: the teacher (name and dtype), the texts (as
a set: their order is the run's, see below), ``max_length``, ``top_k``, the temperature, and whether and how
hidden states are kept. A changed setting gives another folder (recomputed, never reused); old folders stay
until deleted. Texts are stored sorted (length, then text), so the cache does not depend on the run's seed.
A cache is written to ``<key>.partial`` and renamed when complete: an interrupted build starts over.

The loss against the cache is :func:`topk_kl` (see its docstring for the formula).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fedprompt.errors import ConfigError, DataError
from fedprompt.models.scoring import position_ids_from_mask

CACHE_VERSION = 1
HIDDEN_DTYPES = {"float16": np.float16, "float32": np.float32}


def texts_digest(texts: Sequence[str]) -> str:
    """A hash of ``texts`` in the given order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def cache_key(teacher_name: str, teacher_dtype: str, texts: Sequence[str], max_length: int, top_k: int,
              temperature: float, hidden: bool, hidden_dtype: str) -> dict:
    """Everything the cached values depend on (the folder name is a hash of it)."""
    return {"version": CACHE_VERSION, "teacher": str(teacher_name), "teacher_dtype": str(teacher_dtype),
            "texts": texts_digest(sorted(set(texts))), "n_texts": len(set(texts)), "max_length": int(max_length),
            "top_k": int(top_k), "temperature": float(temperature), "hidden": bool(hidden),
            "hidden_dtype": hidden_dtype if hidden else None}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CachedTargets:
    """The teacher's cached outputs for the real tokens of one batch, in the order ``mask.bool()`` flattens them."""

    logp: torch.Tensor  # (tokens, k) float32: log p_T of the teacher's top-k ids
    ids: torch.Tensor  # (tokens, k) int64
    log_tail: torch.Tensor  # (tokens,) float32: log of the teacher's mass outside the top-k (-inf: none)
    hidden: torch.Tensor | None  # (tokens, H) float32, or None when not cached
    lengths: list[int]  # real tokens of each text of the batch


class TeacherCache:
    """A complete cache folder, opened read-only (memory-mapped)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.folder} is not a complete teacher cache (no meta.json); delete it to rebuild")
        self.meta = json.loads(meta_path.read_text())
        self.key = self.meta["key"]
        self.texts: list[str] = json.loads((self.folder / "texts.json").read_text())
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.offsets = np.load(self.folder / "offsets.npy")
        self.logp = np.load(self.folder / "topk_logp.npy", mmap_mode="r")
        self.ids = np.load(self.folder / "topk_ids.npy", mmap_mode="r")
        self.log_tail = np.load(self.folder / "log_tail.npy", mmap_mode="r")
        self.hidden = np.load(self.folder / "hidden.npy", mmap_mode="r") if self.key["hidden"] else None

    @property
    def temperature(self) -> float:
        return float(self.key["temperature"])

    @property
    def top_k(self) -> int:
        return int(self.key["top_k"])

    def targets(self, texts: Sequence[str], lengths: Sequence[int], device) -> CachedTargets:
        """The cached rows of ``texts``, checked against ``lengths`` (the real tokens of each in the batch)."""
        rows = []
        for text, n in zip(texts, lengths):
            i = self.index.get(text)
            if i is None:
                raise DataError(f"a distillation text is not in the teacher cache {self.folder}; delete it to rebuild")
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            if end - start != int(n):
                raise DataError(f"the teacher cache {self.folder} has {end - start} tokens for a text the tokenizer "
                                f"makes {n} tokens; delete the cache folder to rebuild it")
            rows.append((start, end))
        index = np.concatenate([np.arange(s, e) for s, e in rows])

        def take(array, dtype):
            return torch.from_numpy(np.ascontiguousarray(array[index]).astype(dtype)).to(device)

        return CachedTargets(
            logp=take(self.logp, np.float32), ids=take(self.ids, np.int64), log_tail=take(self.log_tail, np.float32),
            hidden=None if self.hidden is None else take(self.hidden, np.float32), lengths=[int(n) for n in lengths])


def cache_dir_for(root: Path, key: dict) -> Path:
    return Path(root) / key_hash(key)


def build_teacher_cache(teacher, tokenizer, texts: Sequence[str], root: Path, key: dict, batch_size: int,
                        progress: Callable[[int, int], None] | None = None) -> tuple[TeacherCache, dict]:
    """The cache of ``key`` under ``root``: opened if complete, else computed (teacher forward, in batches).

    Returns the cache and facts about it: ``reused`` (bool), ``seconds`` (the build, 0 when reused), ``bytes``.
    """
    folder = cache_dir_for(root, key)
    if (folder / "meta.json").is_file():
        cache = TeacherCache(folder)
        if cache.key != key:  # a hash collision or a hand-edited folder
            raise DataError(f"the teacher cache {folder} was made with other settings; delete it to rebuild")
        return cache, {"folder": str(folder), "reused": True, "seconds": 0.0, "bytes": _size(folder)}
    start = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    unique = sorted(set(texts))
    lengths = [len(ids) for ids in tokenizer(unique, add_special_tokens=True)["input_ids"]]
    if max(lengths) > key["max_length"]:
        raise DataError(f"a distillation text has {max(lengths)} tokens, over max_length={key['max_length']}")
    order = sorted(range(len(unique)), key=lambda i: (lengths[i], unique[i]))
    unique, lengths = [unique[i] for i in order], [lengths[i] for i in order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total, k = int(offsets[-1]), int(key["top_k"])
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    if k > vocab:
        raise ConfigError(f"distill.teacher_cache.top_k={k} is more than the teacher's vocabulary ({vocab})")
    open_ = np.lib.format.open_memmap
    logp_out = open_(partial / "topk_logp.npy", mode="w+", dtype=np.float32, shape=(total, k))
    ids_out = open_(partial / "topk_ids.npy", mode="w+", dtype=np.uint16 if vocab <= 65535 else np.int32, shape=(total, k))
    tail_out = open_(partial / "log_tail.npy", mode="w+", dtype=np.float32, shape=(total,))
    hidden_out = None
    if key["hidden"]:
        width = int(teacher.config.hidden_size)
        hidden_out = open_(partial / "hidden.npy", mode="w+", dtype=HIDDEN_DTYPES[key["hidden_dtype"]], shape=(total, width))
    device = next(teacher.parameters()).device
    temp = float(key["temperature"])
    teacher.eval()
    with torch.no_grad():
        for b in range(0, len(unique), batch_size):
            batch = unique[b: b + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=key["max_length"]).to(device)
            out = teacher(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=key["hidden"],
                          position_ids=position_ids_from_mask(enc.attention_mask), use_cache=False)
            real = enc.attention_mask.bool()
            lo, hi = int(offsets[b]), int(offsets[min(b + batch_size, len(unique))])
            if int(real.sum()) != hi - lo:
                raise DataError("the tokenizer's batch lengths differ from its single-text lengths; use the online "
                                "teacher (distill.teacher_cache.enabled=false)")
            logp = torch.log_softmax(out.logits[real].float() / temp, -1)
            values, ids = logp.topk(k, dim=-1)
            log_tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
            logp_out[lo:hi] = values.cpu().numpy()
            ids_out[lo:hi] = ids.cpu().numpy().astype(ids_out.dtype)
            tail_out[lo:hi] = log_tail.cpu().numpy()
            if hidden_out is not None:
                hidden_out[lo:hi] = out.hidden_states[-1][real].float().cpu().numpy().astype(hidden_out.dtype)
            if progress is not None:
                progress(min(b + batch_size, len(unique)), len(unique))
    for array in (logp_out, ids_out, tail_out, hidden_out):
        if array is not None:
            array.flush()
    del logp_out, ids_out, tail_out, hidden_out
    np.save(partial / "offsets.npy", offsets)
    (partial / "texts.json").write_text(json.dumps(unique))
    seconds = round(time.perf_counter() - start, 2)
    (partial / "meta.json").write_text(json.dumps({"key": key, "tokens": total, "build_s": seconds}, indent=2) + "\n")
    partial.rename(folder)
    return TeacherCache(folder), {"folder": str(folder), "reused": False, "seconds": seconds, "bytes": _size(folder)}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def topk_kl(s_logits: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor, log_tail: torch.Tensor,
            temp: float) -> torch.Tensor:
    """T^2 * KL between the teacher's top-k distribution with one tail bucket and the student's, row-averaged.

    With S the teacher's top-k ids at a position, p = softmax(z_teacher / T), q = softmax(z_student / T):

        p_tail = 1 - sum_{i in S} p_i,           q_tail = 1 - sum_{i in S} q_i = sum_{j not in S} q_j
        KL_k   = sum_{i in S} p_i (log p_i - log q_i)  +  p_tail (log p_tail - log q_tail)
        loss   = T^2 * mean over positions of KL_k

    i.e. the exact KL between the two distributions over k + 1 outcomes (the top-k ids and "any other id").
    It is <= the full KL (merging outcomes never raises a KL) and equals it when k is the vocabulary (S is
    everything, p_tail = 0). ``log q_tail`` is a logsumexp over the ids outside S (no 1 - sum cancellation);
    the p_tail * log p_tail term is 0 when p_tail = 0. ``logp`` and ``log_tail`` are the teacher's, at T.
    """
    log_q = torch.log_softmax(s_logits.float() / temp, -1)
    log_q_top = log_q.gather(-1, ids)
    # The ids outside S: the top-k set to the most negative float (not -inf: an empty complement stays finite).
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, torch.finfo(log_q.dtype).min), -1)
    p_top = logp.exp()
    top = (p_top * (logp - log_q_top)).sum(-1)
    p_tail = log_tail.exp()
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return (top + tail).mean() * temp**2
