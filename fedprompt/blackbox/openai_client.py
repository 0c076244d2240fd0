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
- ``echo`` (servers that return prompt log-probs: vLLM, llama-cpp-python, ``fedprompt serve``; not
  OpenAI's hosted chat models): one prompt per (text, label), ``echo=true, max_tokens=1, logprobs=1`` (1,
  not 0: several servers refuse 0); the score is the sum of the log-probs of the echoed tokens that start
  inside the label. Exact for multi-token labels, as long as the server's tokenizer does not merge the
  label into the text's last token (labels that start with a space are safe with BPE tokenizers).

Prompts per request: both modes build a flat list of prompts (texts, or text + label pairs) and send it
in requests of at most ``chunk_size`` prompts, and at most ``max_prompts_per_request`` if given. Servers
differ: vLLM and ``fedprompt serve`` take a list, llama-cpp-python's server takes one prompt per request
(it answers 500 to more). With ``max_prompts_per_request=None`` the client finds out: when a request of
several prompts gets a 4xx/5xx answer (other than 401/403/404/429), or fewer choices than prompts, and
the same request's first prompt alone succeeds, it sends one prompt per request from then on, for this server and model in this process,
and logs that once. A single prompt is sent as a string, which every such server accepts.

Exact ties between label scores (labels outside the top-k share one floor, for instance) are broken by
:func:`fedprompt.ties.pick_labels`' rule, keyed by the text.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage
from fedprompt.blackbox.errors import BadResponse, BlackBoxError, ValidationFailed
from fedprompt.blackbox.protocol import check_strings
from fedprompt.blackbox.settings import LABEL_MODES
from fedprompt.blackbox.transport import JsonTransport, require
from fedprompt.ties import pick_labels

log = logging.getLogger("fedprompt.blackbox")

# (base URL, model) -> prompts per request that server was found to take, for every client in this process.
_LEARNED_LIMITS: dict[tuple[str, str], int] = {}
_LEARNED_LOCK = threading.Lock()
# Answers to a request of several prompts that may mean "one prompt per request": not auth, not an unknown
# path or model, not a budget or overload answer.
_NOT_A_BATCH_REFUSAL = (401, 403, 404, 429)


class WrongChoiceCount(BadResponse):
    """A 2xx answer with another number of choices than prompts (a server that reads only the first)."""


def refuses_batch(err: BlackBoxError) -> bool:
    """Whether ``err``, raised by a request of several prompts, may mean the server takes fewer: a 4xx/5xx
    answer that is not about the key, the path, the budget or load, or the wrong number of choices.
    No answer at all (connection errors) is not such a refusal."""
    if isinstance(err, WrongChoiceCount):
        return True
    status = err.http_status
    return status is not None and 400 <= status < 600 and status not in _NOT_A_BATCH_REFUSAL


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
    def __init__(self, base_url: str, model: str | None, api_key: str | None = None, *, label_mode: str = "first_token",
                 top_logprobs: int = 20, tokenizer=None, chunk_size: int = 32, max_prompts_per_request: int | None = None,
                 timeout_s: float = 300.0, connect_timeout_s: float = 5.0, retries: int = 4, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, ca_file: str | None = None, transport=None, sleep=time.sleep) -> None:
        super().__init__()
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if not model:
            raise ValueError("OpenAICompatibleBlackBox needs the server's model name (service.openai.model)")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_prompts_per_request is not None and max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be >= 1 or None, got {max_prompts_per_request}")
        if isinstance(tokenizer, str):
            from fedprompt.models.registry import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.model, self.label_mode, self.top_logprobs, self.tokenizer = model, label_mode, top_logprobs, tokenizer
        self.chunk_size = chunk_size
        api_key = api_key or os.environ.get("FEDPROMPT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.transport = JsonTransport(normalize_base_url(base_url), api_key, timeout_s=timeout_s,
                                       connect_timeout_s=connect_timeout_s, retries=retries, backoff_s=backoff_s,
                                       max_backoff_s=max_backoff_s, ca_file=ca_file, transport=transport, sleep=sleep)
        self.url = self.transport.base_url
        self._key = (self.url, model)
        # Configured, else learned earlier in this process, else None: unknown until a request of several
        # prompts succeeds (then self._probing turns False) or is refused (then 1).
        self.max_prompts = max_prompts_per_request or _LEARNED_LIMITS.get(self._key)
        self._probing = self.max_prompts is None

    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        if isinstance(texts, str) or isinstance(labels, str):
            raise ValidationFailed("texts and labels must be lists of strings, not a single string")
        texts, labels = list(texts), list(labels)
        check_strings(texts, "texts")
        check_strings(labels, "labels")
        if not labels or len(set(labels)) != len(labels) or any(not label for label in labels):
            raise ValidationFailed(f"labels must be distinct non-empty strings, got {labels}", param="labels")
        if self.label_mode == "first_token":
            firsts = self._first_tokens(labels)  # may refuse the labels
            choices, cost = self._complete_all({"max_tokens": 1, "logprobs": self.top_logprobs}, texts)
            scores, floored = self._first_token(choices, labels, firsts)
        else:
            prompts = [text + label for text in texts for label in labels]
            choices, cost = self._complete_all({"max_tokens": 1, "echo": True, "logprobs": 1}, prompts)
            scores, floored = self._echo(choices, texts, labels)
        self.usage.add(cost)
        predictions = [int(i) for i in pick_labels(scores, texts)[0]] if len(texts) else []
        return ClassifyResult(predictions, None if labels_only else scores, cost,
                              floored=None if labels_only else floored)

    def _complete_all(self, payload: dict, prompts: list[str]) -> tuple[list[dict], Usage]:
        """The choices for ``prompts``, in order, over as many requests as the server's limit needs."""
        choices: list[dict] = []
        cost = Usage()
        start = 0
        while start < len(prompts):
            size = min(len(prompts) - start, self.chunk_size, self.max_prompts or self.chunk_size)
            group = prompts[start : start + size]
            probe = self._probing and size > 1
            try:
                got, usage = self._complete(payload, group, probe=probe)
            except BlackBoxError as err:
                if not probe or not refuses_batch(err):
                    raise
                # Refused with several prompts: try the first alone. If that fails too, its error (not the
                # batch's) is the one to show, and nothing is learned.
                got, usage = self._complete(payload, group[:1])
                self._learn(1, f"a request of {size} prompts got {err.message}")
                size = 1
            else:
                if probe:
                    self._probing = False  # several prompts a request work here
            choices += got
            cost.add(usage)
            start += size
        return choices, cost

    def _learn(self, limit: int, why: str) -> None:
        self.max_prompts, self._probing = limit, False
        with _LEARNED_LOCK:
            known = _LEARNED_LIMITS.get(self._key)
            _LEARNED_LIMITS[self._key] = limit
        if known != limit:
            log.warning("%s takes %d prompt(s) per request: %s. Sending %d per request from now on "
                        "(service.client.max_prompts_per_request=%d skips this probe)", self.url, limit, why, limit, limit)

    def _complete(self, payload: dict, prompts: list[str], probe: bool = False) -> tuple[list[dict], Usage]:
        prompt = prompts[0] if len(prompts) == 1 else prompts  # one prompt as a string: every server takes that
        exchange = self.transport.request("POST", "/completions",
                                          {"model": self.model, "temperature": 0, "prompt": prompt, **payload},
                                          retry_5xx=not probe)
        where = f"POST {self.transport.url('/completions')}"
        choices = require(exchange.body, "choices", where)
        if not isinstance(choices, list) or len(choices) != len(prompts):
            got = len(choices) if isinstance(choices, list) else repr(choices)[:100]
            raise WrongChoiceCount(f"{where} returned {got} choices for {len(prompts)} prompts")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        usage = exchange.body.get("usage") or {}
        return choices, Usage(requests=1, queries=len(prompts), prompt_tokens=int(usage.get("prompt_tokens", 0)),
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

    def _first_token(self, choices: list[dict], labels: list[str], firsts: list[str] | None):
        rows = np.zeros((len(choices), len(labels)), np.float32)
        marks = np.zeros((len(choices), len(labels)), bool)
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
        return rows, marks

    def _echo(self, choices: list[dict], texts: list[str], labels: list[str]):
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
        return rows, np.zeros_like(rows, dtype=bool)

    def close(self) -> None:
        self.transport.close()
