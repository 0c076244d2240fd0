"""Label-word scoring for causal LMs: log p(label word | formatted input), batched with left padding.

A label word may span several tokens; its score is the sum of its tokens' log-probabilities, each
conditioned on the input and the label's earlier tokens. When every label word is a single token, one
forward pass per batch scores all labels at once (the common case); otherwise each (input, label) pair
is one row. Inputs are sorted by length so that batches carry little padding.

Precision: scoring (:func:`forward_logits`) projects the last hidden states onto the vocabulary in float32
whatever the model's dtype. A bf16 LM head rounds every logit to 8 significant bits, so two label words
often got exactly the same score (11 of 300 SST-2 rows with SmolLM2 in bf16), and ``argmax`` gave every
such tie to the first label. Exact ties that remain are broken by :func:`pick_labels`.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from fedprompt.errors import ConfigError
from fedprompt.ties import pick_labels, tie_key  # noqa: F401  (re-exported: the rule for exact ties)


def encode_label_words(tokenizer, label_words: Sequence[str]) -> list[list[int]]:
    """Token ids of each label word (no special tokens); raises if one is empty or two coincide."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in label_words]
    for word, toks in zip(label_words, ids):
        if not toks:
            raise ConfigError(f"label word {word!r} tokenizes to nothing with this model's tokenizer; choose another word")
    if len({tuple(t) for t in ids}) != len(ids):
        raise ConfigError(f"two label words tokenize to the same ids: {dict(zip(label_words, ids))}; make them distinct")
    return ids


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    order = np.argsort(np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands a KV cache back to ``model.forward``: ``cache`` in transformers >= 5.24
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def output_cache(output):
    """The KV cache of a forward output, whichever name this transformers version gives it."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _keep_kwargs(model, keep_last: int | None) -> dict:
    # Scoring reads only the last few positions; projecting just those onto the vocabulary skips most of
    # the LM head's work (49k x hidden per position for SmolLM2). Models without the option get all.
    if keep_last is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_fedprompt_contiguous", False):
        # transformers slices the hidden states non-contiguously for logits_to_keep; on CPU a bf16
        # matmul on such a view is ~100x slower than on a contiguous copy (2.2 s vs 0.016 s measured).
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
        head._fedprompt_contiguous = True
    return {"logits_to_keep": keep_last}


_HEAD_LOCK = threading.Lock()


@contextmanager
def float32_head(model):
    """Within the block, the LM head (a ``torch.nn.Linear``) computes its logits in float32 from the (bf16 or
    fp16) hidden states: the label scores then carry float32's precision, not the model dtype's. The
    weight is upcast per call (a transient copy: 113 MB for SmolLM2-135M's 49k x 576 head), not kept. A
    float32 model, or a head of another kind, is left as it is. Nested and concurrent blocks share one
    patch (counted), removed when the last block ends."""
    head = model.get_output_embeddings()
    if (not isinstance(head, torch.nn.Linear) or head.weight.dtype == torch.float32
            or not head.weight.dtype.is_floating_point or head.weight.device.type == "meta"):
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        bias = head.bias.float() if head.bias is not None else None
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)

    with _HEAD_LOCK:
        users = head.__dict__.get("_fedprompt_f32_users", 0)
        if users == 0:
            head._fedprompt_f32_saved = head.__dict__.get("forward")  # an instance-level forward of someone else
            head.forward = forward
        head._fedprompt_f32_users = users + 1
    try:
        yield
    finally:
        with _HEAD_LOCK:
            head._fedprompt_f32_users -= 1
            if head._fedprompt_f32_users == 0:
                saved = head.__dict__.pop("_fedprompt_f32_saved", None)
                if saved is None:
                    del head.forward
                else:
                    head.forward = saved


@torch.no_grad()
def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, soft_prompt=None,
                   keep_last: int | None = None) -> torch.Tensor:
    """Float32 logits of a left-padded batch (the last ``keep_last`` positions, or all), optional soft
    prompt; the LM head runs in float32 (:func:`float32_head`)."""
    with float32_head(model):
        return prompted_logits(model, input_ids, attention_mask, soft_prompt, keep_last).float()


def prompted_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, soft_prompt=None,
                    keep_last: int | None = None) -> torch.Tensor:
    """:func:`forward_logits` with autograd on (soft-prompt training backpropagates through it).

    ``soft_prompt`` is called as ``soft_prompt(embeds, attention_mask)`` (positionally: Opacus' hooks see
    only positional inputs), so a module wrapping a :class:`SoftPrompt` works too.
    """
    kwargs = _keep_kwargs(model, keep_last)
    if soft_prompt is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs).logits
    else:
        embeds = model.get_input_embeddings()(input_ids)
        embeds, attention_mask = soft_prompt(embeds, attention_mask)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs).logits
    return logits if keep_last is None else logits[:, -keep_last:]


def score_label_words(
    model,
    tokenizer,
    inputs: Sequence[str],
    label_words: Sequence[str],
    batch_size: int = 16,
    soft_prompt=None,
    progress=None,
) -> np.ndarray:
    """``(len(inputs), len(label_words))`` array of log p(label word | input) (float32)."""
    label_ids = encode_label_words(tokenizer, label_words)
    encoded = tokenizer(list(inputs), add_special_tokens=True)["input_ids"]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = np.zeros((len(inputs), len(label_words)), dtype=np.float32)
    single = all(len(t) == 1 for t in label_ids)

    if single:
        first = torch.tensor([t[0] for t in label_ids], device=device)
        for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask = _left_pad([encoded[i] for i in idx], pad_id, device)
            logits = forward_logits(model, ids, mask, soft_prompt, keep_last=1)[:, -1, :].float()
            scores[idx] = torch.log_softmax(logits, dim=-1)[:, first].cpu().numpy()
            if progress is not None:
                progress(len(idx))
        return scores

    # Multi-token label words: one row per (input, label); right-aligned so label tokens sit at the end.
    rows = [(i, c) for i in range(len(inputs)) for c in range(len(label_ids))]
    seqs = [encoded[i] + label_ids[c] for i, c in rows]
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = _left_pad([seqs[r] for r in idx], pad_id, device)
        keep = max(len(label_ids[rows[r][1]]) for r in idx) + 1
        logprobs = torch.log_softmax(forward_logits(model, ids, mask, soft_prompt, keep_last=keep).float(), dim=-1)
        for b, r in enumerate(idx):
            i, c = rows[r]
            m = len(label_ids[c])
            targets = torch.tensor(label_ids[c], device=device)
            # logits at position t predict token t+1: the m label tokens are predicted by positions [-m-1, -1).
            scores[i, c] = logprobs[b, -m - 1 : -1, :].gather(-1, targets[:, None]).sum().item()
        if progress is not None:
            progress(len(idx) / len(label_ids))  # in inputs, so one bar fits both paths
    return scores


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def calibrate_mean(log_scores: np.ndarray) -> np.ndarray:
    """Mean calibration: divide each label's probability by its mean over the inputs, renormalise.

    Cancels the model's prior preference for some label words (Zhao et al. 2021, contextual
    calibration with the evaluated inputs standing in for the content-free input).
    """
    logp = log_scores - np.logaddexp.reduce(log_scores, axis=1, keepdims=True)
    mean_p = np.exp(logp).mean(axis=0, keepdims=True)
    return logp - np.log(np.clip(mean_p, 1e-12, None))
