"""Client of a ``fedprompt serve`` server: ``POST /v1/classify`` in chunks, over httpx."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage
from fedprompt.blackbox.errors import BadResponse, ValidationFailed
from fedprompt.blackbox.protocol import check_strings, classify_request
from fedprompt.blackbox.transport import JsonTransport, require

API_KEY_ENV = "FEDPROMPT_API_KEY"


class HttpBlackBox(BlackBoxLM):
    """``usage`` counts what this client sent: requests answered, queries, the server's token counts, and
    the request/response body bytes of every attempt (headers excluded)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *, model: str | None = None,
                 chunk_size: int = 128, timeout_s: float = 300.0, connect_timeout_s: float = 5.0, retries: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, ca_file: str | None = None, transport=None,
                 sleep=time.sleep) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.url, self.model, self.chunk_size = url.rstrip("/"), model, chunk_size
        self.transport = JsonTransport(url, api_key or os.environ.get(API_KEY_ENV), timeout_s=timeout_s,
                                       connect_timeout_s=connect_timeout_s, retries=retries, backoff_s=backoff_s,
                                       max_backoff_s=max_backoff_s, ca_file=ca_file, transport=transport, sleep=sleep)

    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        if isinstance(texts, str) or isinstance(labels, str):
            raise ValidationFailed("texts and labels must be lists of strings, not a single string")
        texts, labels = list(texts), list(labels)
        check_strings(texts, "texts")
        check_strings(labels, "labels")
        if not texts:
            return ClassifyResult([], None if labels_only else np.zeros((0, len(labels)), np.float32))
        predictions: list[int] = []
        rows: list[list[float]] = []
        cost = Usage()
        for start in range(0, len(texts), self.chunk_size):
            chunk = texts[start : start + self.chunk_size]
            exchange = self.transport.request("POST", "/v1/classify", classify_request(chunk, labels, labels_only, self.model))
            body = exchange.body
            preds = require(body, "predictions", "/v1/classify")
            usage = require(body, "usage", "/v1/classify")
            if len(preds) != len(chunk):
                raise BadResponse(f"POST {self.transport.url('/v1/classify')} returned {len(preds)} predictions "
                                  f"for {len(chunk)} texts")
            predictions += [int(p) for p in preds]
            if not labels_only:
                chunk_rows = require(body, "logprobs", "/v1/classify")
                if not isinstance(chunk_rows, list) or len(chunk_rows) != len(chunk) or any(len(r) != len(labels) for r in chunk_rows):
                    raise BadResponse(f"POST {self.transport.url('/v1/classify')} returned log-probs of the wrong "
                                      f"shape for {len(chunk)}x{len(labels)}")
                rows += chunk_rows
            cost.add(Usage(requests=1, queries=int(usage.get("queries", len(chunk))),
                           prompt_tokens=int(usage.get("prompt_tokens", 0)),
                           completion_tokens=int(usage.get("completion_tokens", 0)),
                           bytes_sent=exchange.bytes_sent, bytes_received=exchange.bytes_received))
        self.usage.add(cost)
        logprobs = None if labels_only else np.asarray(rows, dtype=np.float32)
        return ClassifyResult(predictions, logprobs, cost)

    def server_usage(self, everyone: bool = False) -> dict:
        """The server's account of this key (``GET /v1/usage``): usage, budget, what remains."""
        return self.transport.request("GET", "/v1/usage?all=true" if everyone else "/v1/usage").body

    def health(self) -> dict:
        return self.transport.request("GET", "/health").body

    def close(self) -> None:
        self.transport.close()
