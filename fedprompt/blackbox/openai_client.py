"""Client of any OpenAI-compatible completions server (vLLM, llama.cpp server, hosted APIs, ``fedprompt serve``).

Label scoring from what the OpenAI protocol exposes (``label_mode``):

- ``first_token`` (default, works everywhere that returns ``logprobs``): one request per chunk of texts,
  ``max_tokens=1, temperature=0, logprobs=k`` (k <= 20; some hosts cap it at 5). A label's score is the
  log-prob of its *first token* found among the top-k next tokens. The first token is read with the
  ``tokenizer`` if given (exact), else taken as the longest top-k token that is a prefix of the label
  (a prefix shared by two labels counts for neither; pass the tokenizer when labels span several tokens).
  A label absent from the top-k gets a floor that bounds its true value from above:
  ``min(k-th log-prob, log(1 - sum of the top-k probabilities)))``; ``ClassifyResult.floored`` marks those
  entries. For labels of one token present in the top-k this equals :func:`score_label_words`; for
  multi-token labels it scores the first token only, so labels must differ in their first token.
- ``echo`` (servers that return prompt log-probs: vLLM, ``fedprompt serve``; not OpenAI's hosted chat
  models): one prompt per (text, label), ``echo=true, max_tokens=1, logprobs=1`` (1, not 0: several
  servers refuse 0); the score is the sum of the log-probs of the echoed tokens that start inside the label. Exact for multi-token labels,
  as long as the server's tokenizer does not merge the label into the text's last token (labels that
  start with a space are safe with BPE tokenizers).
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage
from fedprompt.blackbox.errors import BadResponse, ValidationFailed
from fedprompt.blackbox.protocol import check_strings
from fedprompt.blackbox.settings import LABEL_MODES
from fedprompt.blackbox.transport import JsonTransport, require


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL that already has a path is kept as given."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def top_logprobs_of(choice: dict, position: int = 0) -> dict[str, float]:
    """The top-k map at one generated position, from the legacy or the newer (chat-like) shape."""
    logprobs = choice.get("logprobs") or {}
    if isinstance(logprobs.get("top_logprobs"), list):  # legacy: [{token: logprob}, ...]
        entry = logprobs["top_logprobs"][position]
        return {str(k): float(v) for k, v in (entry or {}).items()}
    if isinstance(logprobs.get("content"), list):  # llama.cpp & co: [{token, logprob, top_logprobs: [...]}]
        entry = logprobs["content"][position]
        return {str(t["token"]): float(t["logprob"]) for t in entry.get("top_logprobs") or []}
    raise BadResponse(f"the server returned no top log-probs (got {str(choice)[:200]}); it must support `logprobs`")


def label_floor(top: dict[str, float]) -> float:
    """An upper bound on the log-prob of any token outside ``top``."""
    if not top:
        return -math.inf
    rest = 1.0 - sum(math.exp(v) for v in top.values())
    return min(min(top.values()), math.log(rest) if rest > 1e-12 else -27.6)


class OpenAICompatibleBlackBox(BlackBoxLM):
    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, label_mode: str = "first_token",
                 top_logprobs: int = 20, tokenizer=None, chunk_size: int = 32, timeout_s: float = 300.0,
                 connect_timeout_s: float = 5.0, retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 ca_file: str | None = None, transport=None, sleep=time.sleep) -> None:
        super().__init__()
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if not model:
            raise ValueError("OpenAICompatibleBlackBox needs the server's model name (service.openai.model)")
        if isinstance(tokenizer, str):
            from fedprompt.models.registry import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.model, self.label_mode, self.top_logprobs, self.tokenizer = model, label_mode, top_logprobs, tokenizer
        self.chunk_size = chunk_size
        api_key = api_key or os.environ.get("FEDPROMPT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.transport = JsonTransport(normalize_base_url(base_url), api_key, timeout_s=timeout_s,
                                       connect_timeout_s=connect_timeout_s, retries=retries, backoff_s=backoff_s,
                                       max_backoff_s=max_backoff_s, ca_file=ca_file, transport=transport, sleep=sleep)

    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        if isinstance(texts, str) or isinstance(labels, str):
            raise ValidationFailed("texts and labels must be lists of strings, not a single string")
        texts, labels = list(texts), list(labels)
        check_strings(texts, "texts")
        check_strings(labels, "labels")
        if not labels or len(set(labels)) != len(labels) or any(not label for label in labels):
            raise ValidationFailed(f"labels must be distinct non-empty strings, got {labels}", param="labels")
        scores = np.zeros((len(texts), len(labels)), np.float32)
        floored = np.zeros((len(texts), len(labels)), bool)
        cost = Usage()
        score = self._first_token if self.label_mode == "first_token" else self._echo
        firsts = self._first_tokens(labels) if self.label_mode == "first_token" else None  # may refuse the labels
        step = self.chunk_size if self.label_mode == "first_token" else max(1, self.chunk_size // len(labels))
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            rows, marks, usage = score(chunk, labels, firsts)
            scores[start : start + len(chunk)], floored[start : start + len(chunk)] = rows, marks
            cost.add(usage)
        self.usage.add(cost)
        predictions = [int(i) for i in scores.argmax(axis=1)] if len(texts) else []
        return ClassifyResult(predictions, None if labels_only else scores, cost,
                              floored=None if labels_only else floored)

    def _complete(self, payload: dict, n_prompts: int) -> tuple[list[dict], Usage]:
        exchange = self.transport.request("POST", "/completions", {"model": self.model, "temperature": 0, **payload})
        choices = require(exchange.body, "choices", "/completions")
        if not isinstance(choices, list) or len(choices) != n_prompts:
            raise BadResponse(f"/completions returned {len(choices) if isinstance(choices, list) else choices!r} "
                              f"choices for {n_prompts} prompts")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        usage = exchange.body.get("usage") or {}
        return choices, Usage(requests=1, queries=n_prompts, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                              completion_tokens=int(usage.get("completion_tokens", 0)),
                              bytes_sent=exchange.bytes_sent, bytes_received=exchange.bytes_received)

    def _first_tokens(self, labels: list[str]) -> list[str] | None:
        if self.tokenizer is None:
            return None
        firsts = [self.tokenizer.decode(self.tokenizer(label, add_special_tokens=False)["input_ids"][:1]) for label in labels]
        if len(set(firsts)) != len(firsts):
            raise ValidationFailed(f"labels {labels} share a first token ({firsts}); label_mode=first_token cannot tell "
                                   "them apart: use label_mode=echo or other label words", param="labels")
        return firsts

    def _first_token(self, texts: list[str], labels: list[str], firsts: list[str] | None):
        choices, usage = self._complete({"prompt": texts, "max_tokens": 1, "logprobs": self.top_logprobs}, len(texts))
        rows = np.zeros((len(texts), len(labels)), np.float32)
        marks = np.zeros((len(texts), len(labels)), bool)
        for i, choice in enumerate(choices):
            top = top_logprobs_of(choice)
            floor = label_floor(top)
            if firsts is not None:
                keys = [f if f in top else None for f in firsts]
            else:  # the longest top-k token that starts the label: BPE's usual first piece
                keys = [max((t for t in top if t and label.startswith(t)), key=len, default=None) for label in labels]
                # A piece shared by two labels (" " for " yes"/" no") is not evidence for either.
                keys = [None if k is not None and keys.count(k) > 1 and k != label else k for k, label in zip(keys, labels)]
            for c, key in enumerate(keys):
                rows[i, c] = top[key] if key is not None else floor
                marks[i, c] = key is None
        return rows, marks, usage

    def _echo(self, texts: list[str], labels: list[str], firsts=None):
        prompts = [text + label for text in texts for label in labels]
        choices, usage = self._complete({"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1}, len(prompts))
        rows = np.zeros((len(texts), len(labels)), np.float32)
        for r, choice in enumerate(choices):
            i, c = divmod(r, len(labels))
            logprobs = choice.get("logprobs") or {}
            offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
            if not isinstance(offsets, list) or not isinstance(values, list):
                raise BadResponse("label_mode=echo needs `text_offset` and `token_logprobs` in the answer; this server "
                                  "does not return prompt log-probs: use label_mode=first_token")
            start, end = len(texts[i]), len(texts[i]) + len(labels[c])
            picked = [v for o, v in zip(offsets, values) if start <= o < end and v is not None]
            if not picked:
                raise BadResponse(f"no token of label {labels[c]!r} found in the echoed prompt")
            rows[i, c] = sum(picked)
        return rows, np.zeros_like(rows, dtype=bool), usage

    def close(self) -> None:
        self.transport.close()
