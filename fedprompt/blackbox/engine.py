"""The model side of the black box: request checks against the limits, label scoring, next-token
log-probs and greedy generation.

The server (behind its dynamic batcher) and the in-process client both call this class, and label scores
come from :func:`fedprompt.models.scoring.score_label_words`, so every client sees the same numbers up to
float rounding from different batch compositions. ``plan_*`` methods only tokenize: they reject a bad
request before any forward pass.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

import numpy as np
import torch

from fedprompt.blackbox.errors import PayloadTooLarge, ValidationFailed
from fedprompt.blackbox.protocol import check_strings
from fedprompt.blackbox.settings import Limits
from fedprompt.errors import ConfigError
from fedprompt.models.scoring import (
    cache_kwargs,
    encode_label_words,
    forward_logits,
    length_sorted_batches,
    output_cache,
    score_label_words,
)

# JSON has no -inf; a log-prob this low means "impossible" and survives the round trip exactly.
LOGPROB_FLOOR = float(np.finfo(np.float32).min)
# Echo keeps every position's logits: the batch's float32 logits plus one row's float32 log-softmax, so a
# position costs about this many bytes per vocabulary entry (Limits.max_echo_mb divides by it).
ECHO_BYTES_PER_LOGIT = 8


class Stopped(Exception):
    """Every caller of a model call gave up (timed out, disconnected) or the server is shutting down: the
    engine raises it between batches so the rest of the work is never done."""


def _never() -> bool:
    return False


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Thread-safe least-recently-used map; ``size`` 0 keeps nothing."""

    def __init__(self, size: int) -> None:
        self.size, self._lock = size, threading.Lock()
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


@dataclass
class ClassifyPlan:
    texts: list[str]
    labels: tuple[str, ...]
    text_tokens: list[int]
    prompt_tokens: int  # tokens the model reads: each text once, plus each (text, label) row for multi-token labels


@dataclass
class PromptPlan:
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]


@dataclass
class CompletionJob:
    prompts: list[PromptPlan]
    max_tokens: int
    top_k: int = 0
    echo: bool = False
    stop: tuple[str, ...] = ()
    # True once the caller gave up: checked between forward passes, so abandoned work stops within one
    stopped: Callable[[], bool] = field(default=_never, repr=False, compare=False)


@dataclass
class Completion:
    """One prompt's answer. ``top`` lists hold (token id, log-prob) pairs, best first."""

    text: str = ""
    gen_ids: list[int] = field(default_factory=list)
    gen_logprobs: list[float] = field(default_factory=list)
    gen_top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # echo: per prompt token, None for the first
    prompt_top: list[list[tuple[int, float]] | None] | None = None
    finish_reason: str = "length"


class ScoringEngine:
    """A causal LM and its tokenizer, guarded by one lock: one forward pass at a time."""

    def __init__(self, model, tokenizer, limits: Limits = Limits(), batch_size: int = 16, cache_size: int = 0,
                 model_id: str = "model") -> None:
        self.model, self.tokenizer, self.limits, self.batch_size = model, tokenizer, limits, batch_size
        self.model_id = model_id
        self.cache: LRUCache[tuple[tuple[str, ...], str], np.ndarray] = LRUCache(cache_size)  # (labels, text) -> row
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self._lock = threading.Lock()
        self._token_text: dict[int, str] = {}
        self.forward_calls = 0
        self.texts_scored = 0

    # ---- checks (cheap: tokenization only) -------------------------------------------------------

    def plan_classify(self, texts: Sequence[str], labels: Sequence[str], prefix_tokens: int = 0) -> ClassifyPlan:
        """Check a request; ``prefix_tokens``: soft-prompt positions prepended to every row (classify_embeds)."""
        lim = self.limits
        if isinstance(texts, str) or isinstance(labels, str):
            raise ValidationFailed("texts and labels must be lists of strings, not a single string")
        if not texts:
            raise ValidationFailed("texts is empty: send at least one text", param="texts")
        if len(texts) > lim.max_batch:
            raise PayloadTooLarge(f"{len(texts)} texts in one request; the limit is {lim.max_batch} "
                                  "(service.limits.max_batch): split the batch", param="texts")
        if not labels:
            raise ValidationFailed("labels is empty: send at least one candidate label", param="labels")
        if len(labels) > lim.max_labels:
            raise PayloadTooLarge(f"{len(labels)} labels; the limit is {lim.max_labels} (service.limits.max_labels)", param="labels")
        check_strings(texts, "texts")
        check_strings(labels, "labels")
        if len(set(labels)) != len(labels):
            raise ValidationFailed(f"labels must be distinct, got {list(labels)}", param="labels")
        try:
            label_ids = encode_label_words(self.tokenizer, labels)
        except ConfigError as err:
            raise ValidationFailed(str(err), param="labels") from None
        longest_label = max(len(ids) for ids in label_ids)
        if longest_label > lim.max_label_tokens:
            raise PayloadTooLarge(f"a label has {longest_label} tokens; the limit is {lim.max_label_tokens} "
                                  "(service.limits.max_label_tokens)", param="labels")
        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        self._check_lengths(lengths, "texts", extra=longest_label + prefix_tokens)
        read = sum(lengths) + prefix_tokens * len(texts)  # the model reads a soft prompt's positions like tokens
        if longest_label == 1:
            tokens = read
        else:
            tokens = read * len(labels) + len(texts) * sum(len(ids) for ids in label_ids)
        if tokens > lim.max_request_tokens:
            raise PayloadTooLarge(f"the request needs {tokens} tokens of model input; the limit is "
                                  f"{lim.max_request_tokens} (service.limits.max_request_tokens): send fewer texts")
        return ClassifyPlan(list(texts), tuple(labels), lengths, tokens)

    def plan_prompts(self, prompts: Sequence[str], max_tokens: int, echo: bool = False, top_k: int = 0) -> list[PromptPlan]:
        lim = self.limits
        if not prompts:
            raise ValidationFailed("prompt is empty: send a string or a non-empty list of strings", param="prompt")
        if len(prompts) > lim.max_batch:
            raise PayloadTooLarge(f"{len(prompts)} prompts in one request; the limit is {lim.max_batch} "
                                  "(service.limits.max_batch)", param="prompt")
        check_strings(prompts, "prompt")
        enc = self.tokenizer(list(prompts), add_special_tokens=True, return_offsets_mapping=True)
        lengths = [len(ids) for ids in enc["input_ids"]]
        self._check_lengths(lengths, "prompt", extra=max_tokens)
        total = sum(lengths) + max_tokens * len(prompts)
        if total > lim.max_request_tokens:
            raise PayloadTooLarge(f"the request needs up to {total} tokens; the limit is {lim.max_request_tokens} "
                                  "(service.limits.max_request_tokens)")
        if echo:
            self._check_echo(lengths)
        self._check_logprob_entries(lengths, max_tokens, echo, top_k)
        return [PromptPlan(p, list(ids), [tuple(o) for o in offs])
                for p, ids, offs in zip(prompts, enc["input_ids"], enc["offset_mapping"])]

    def echo_positions(self) -> int:
        """Positions (rows x padded length) whose logits fit in ``max_echo_mb``: the echo memory bound."""
        return max(int(self.limits.max_echo_mb * 2**20 // (self.vocab_size * ECHO_BYTES_PER_LOGIT)), 1)

    def _check_echo(self, lengths: list[int]) -> None:
        # Echo needs the logits of every prompt position; longer prompts are batched below this bound, and
        # one prompt over it alone would exceed it, so it is refused before any model work.
        most = self.echo_positions()
        for i, n in enumerate(lengths):
            if n > most:
                need = n * self.vocab_size * ECHO_BYTES_PER_LOGIT / 2**20
                raise PayloadTooLarge(
                    f"echo of prompt[{i}] ({n} tokens) needs {need:.0f} MB of logits ({n} positions x {self.vocab_size} "
                    f"vocabulary x {ECHO_BYTES_PER_LOGIT} bytes), over this server's echo bound of "
                    f"{self.limits.max_echo_mb:g} MB (service.limits.max_echo_mb): echo prompts of at most {most} "
                    "tokens, or drop echo", param="prompt")

    def _check_logprob_entries(self, lengths: list[int], max_tokens: int, echo: bool, top_k: int) -> None:
        # Each top log-prob is a Python object while the answer is built (~250 bytes): bound their number.
        positions = sum(lengths) * echo + max_tokens * len(lengths)
        entries = positions * top_k
        if entries > self.limits.max_logprob_entries:
            raise PayloadTooLarge(
                f"the answer would hold {entries} top log-probs ({positions} positions x logprobs={top_k}), over this "
                f"server's limit of {self.limits.max_logprob_entries} (service.limits.max_logprob_entries): ask for "
                "fewer logprobs, fewer max_tokens or prompts per request, or drop echo", param="logprobs")

    def _check_lengths(self, lengths: list[int], what: str, extra: int) -> None:
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValidationFailed(f"{what}[{i}] is empty after tokenization; send some text", param=what)
            if n > self.limits.max_prompt_tokens:
                raise PayloadTooLarge(f"{what}[{i}] has {n} tokens; the limit is {self.limits.max_prompt_tokens} "
                                      "(service.limits.max_prompt_tokens)", param=what)
            if self.context_length and n + extra > self.context_length:
                raise PayloadTooLarge(f"{what}[{i}] has {n} tokens and {extra} more are needed, over this model's "
                                      f"context of {self.context_length} tokens", param=what)

    # ---- label scoring ----------------------------------------------------------------------------

    def classify(self, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        """(N, C) float32 log p(label | text); assumes :meth:`plan_classify` accepted the request."""
        return self.classify_group(tuple(labels), [list(texts)])[0]

    def classify_group(self, labels: tuple[str, ...], text_lists: list[list[str]],
                       stopped: Callable[[], bool] = _never) -> list[np.ndarray]:
        """Score several requests that share their labels in one call; repeated texts are scored once.
        Raises :class:`Stopped` between batches once ``stopped()`` (every caller gave up)."""
        rows: dict[str, np.ndarray] = {}
        missing: dict[str, None] = {}  # the texts to score, each once, in order
        for texts in text_lists:
            for text in texts:
                if text not in rows and text not in missing:
                    row = self.cache.get((labels, text))
                    if row is None:
                        missing[text] = None
                    else:
                        rows[text] = row
        if missing:
            def between_batches(_done) -> None:
                if stopped():
                    raise Stopped()

            with self._lock:
                if stopped():  # gave up while waiting for the lock
                    raise Stopped()
                scores = score_label_words(self.model, self.tokenizer, list(missing), labels, batch_size=self.batch_size,
                                           progress=between_batches)
                self.forward_calls += 1
                self.texts_scored += len(missing)
            scores = np.nan_to_num(scores, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR, posinf=0.0).astype(np.float32)
            for text, row in zip(missing, scores):
                rows[text] = row
                self.cache.put((labels, text), row)
        return [np.stack([rows[t] for t in texts]).astype(np.float32, copy=False) for texts in text_lists]

    def classify_prompted(self, texts: Sequence[str], labels: Sequence[str], soft_prompt: np.ndarray) -> np.ndarray:
        """(N, C) float32 log p(label | soft prompt + text): the same scorer as :meth:`classify`, with the
        prompt's vectors prepended to the input embeddings; never cached (the prompt changes every call)."""
        from fedprompt.models.soft_prompt import SoftPrompt

        weight = torch.from_numpy(np.ascontiguousarray(soft_prompt, dtype=np.float32))
        prompt = SoftPrompt(weight.shape[0], weight.shape[1], weight).to(self.device)
        with self._lock:
            scores = score_label_words(self.model, self.tokenizer, list(texts), tuple(labels),
                                       batch_size=self.batch_size, soft_prompt=prompt)
            self.forward_calls += 1
            self.texts_scored += len(texts)
        return np.nan_to_num(scores, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR, posinf=0.0).astype(np.float32)

    # ---- completions ------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a chat request: the tokenizer's chat template, else ``role: content`` lines."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # jinja raises its own errors for conversations the template rejects
                raise ValidationFailed(f"this model's chat template rejects these messages: {err}", param="messages") from None
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    @torch.no_grad()
    def complete_group(self, jobs: list[CompletionJob]) -> list[list[Completion]]:
        """Answer completion jobs; prompts that need at most one new token share batched forward passes.

        A job whose ``stopped()`` turns true gets no more forward passes (its answer is left partial; the
        caller has gone). Echo rows are batched apart, within ``max_echo_mb``; the others keep one position."""
        out = [[Completion() for _ in job.prompts] for job in jobs]
        single = [(j, p) for j, job in enumerate(jobs) if job.max_tokens == 1 or (job.max_tokens == 0 and job.echo)
                  for p in range(len(job.prompts))]
        with self._lock:
            for echo in (False, True):
                rows = [(j, p) for j, p in single if jobs[j].echo == echo]
                for batch in self._single_batches(jobs, rows, echo):
                    batch = [(j, p) for j, p in batch if not jobs[j].stopped()]
                    if batch:
                        self._single_pass(jobs, out, batch, echo)
            for j, job in enumerate(jobs):
                if job.max_tokens > 1:
                    for p, plan in enumerate(job.prompts):
                        if job.stopped():
                            break
                        out[j][p] = self._generate(job, plan.ids)
                        self.forward_calls += 1
        return out

    def _single_batches(self, jobs: list[CompletionJob], rows: list[tuple[int, int]], echo: bool):
        """Length-sorted batches of ``rows``; with echo also at most ``echo_positions()`` padded positions."""
        lengths = [len(jobs[j].prompts[p].ids) for j, p in rows]
        if not echo:
            for idx in length_sorted_batches(lengths, self.batch_size):
                yield [rows[i] for i in idx]
            return
        budget = self.echo_positions()
        batch: list[tuple[int, int]] = []
        for i in np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable"):
            # sorted by length, so the row added last is the longest: it sets the padded width
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * lengths[i] > budget):
                yield batch
                batch = []
            batch.append(rows[i])
        if batch:
            yield batch

    def _single_pass(self, jobs: list[CompletionJob], out: list[list[Completion]], rows: list[tuple[int, int]],
                     echo: bool) -> None:
        padded = self.tokenizer.pad({"input_ids": [jobs[j].prompts[p].ids for j, p in rows]}, padding=True,
                                    return_tensors="pt", padding_side="left")
        logits = forward_logits(self.model, padded["input_ids"].to(self.device),
                                padded["attention_mask"].to(self.device), keep_last=None if echo else 1)
        self.forward_calls += 1
        for b, (j, p) in enumerate(rows):
            ids = jobs[j].prompts[p].ids
            self._fill(out[j][p], jobs[j], ids, logits[b, logits.shape[1] - len(ids):].float())

    def _fill(self, comp: Completion, job: CompletionJob, ids: list[int], logits: torch.Tensor) -> None:
        """Echo log-probs and, if asked for, the first greedy token from one unpadded row of logits."""
        if job.echo:
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(ids[1:], device=logprobs.device)
            picked = logprobs.gather(-1, targets[:, None])[:, 0].tolist() if len(ids) > 1 else []
            comp.prompt_logprobs = [None] + [max(v, LOGPROB_FLOOR) for v in picked]
            comp.prompt_top = [None] + [self._top(row, job.top_k) for row in logprobs]
        if job.max_tokens == 1:
            self._step(comp, torch.log_softmax(logits[-1], dim=-1), job)

    def _step(self, comp: Completion, logprobs: torch.Tensor, job: CompletionJob) -> bool:
        """Append the greedy token; False when generation must stop (end of sequence or a stop string)."""
        token = int(logprobs.argmax())
        if token in self.eos_ids:
            comp.finish_reason = "stop"
            return False
        comp.gen_ids.append(token)
        comp.gen_logprobs.append(max(float(logprobs[token]), LOGPROB_FLOOR))
        comp.gen_top.append(self._top(logprobs, job.top_k))
        comp.text = self.tokenizer.decode(comp.gen_ids)
        for stop in job.stop:
            cut = comp.text.find(stop)
            if cut >= 0:
                comp.text, comp.finish_reason = comp.text[:cut], "stop"
                return False
        return True

    @staticmethod
    def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        values, indices = torch.topk(logprobs, k)
        return [(int(i), max(float(v), LOGPROB_FLOOR)) for v, i in zip(values.tolist(), indices.tolist())]

    def _generate(self, job: CompletionJob, ids: list[int]) -> Completion:
        """Greedy decoding of one prompt with a KV cache (no padding, so no position bookkeeping)."""
        comp = Completion()
        result = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        logits = result.logits[0].float()
        if job.echo:
            self._fill(comp, CompletionJob([], 0, job.top_k, True), ids, logits)
        past, next_logits = output_cache(result), logits[-1]
        for step in range(job.max_tokens):
            if not self._step(comp, torch.log_softmax(next_logits, dim=-1), job) or step == job.max_tokens - 1:
                break
            if job.stopped():  # one token step is the smallest unit of work: stop here, the caller has gone
                break
            result = self.model(input_ids=torch.tensor([[comp.gen_ids[-1]]], device=self.device),
                                **cache_kwargs(self.model, past))
            past, next_logits = output_cache(result), result.logits[0, -1].float()
        return comp
