"""Wire format: request models (pydantic, strict, unknown fields rejected), JSON encoding, and the
response bodies that the server sends and the in-process client reproduces byte for byte.

``POST /v1/classify`` is fedprompt's batch endpoint; ``/v1/completions`` and ``/v1/chat/completions``
follow the OpenAI protocol (greedy decoding only). See docs/blackbox.md.
"""

from __future__ import annotations

import json
from typing import Literal, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedprompt.blackbox.errors import InvalidRequest, ValidationFailed


def encode_json(obj) -> bytes:
    """The one JSON encoding used on the wire (compact, UTF-8), so byte counts agree across clients."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class _Request(BaseModel):
    # strict: "3" is not 3 and 1.5 is not an int; allow_inf_nan: JSON's NaN/Infinity extensions are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ClassifyRequest(_Request):
    model: str | None = None
    texts: list[str]
    labels: list[str]
    labels_only: bool = False


class _Sampling(_Request):
    """OpenAI sampling fields; only greedy decoding is served, other values are refused (400)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


RequestT = TypeVar("RequestT", bound=_Request)


def parse_request(body: bytes, model_cls: type[RequestT]) -> RequestT:
    """Parse and validate a JSON body: 400 if it is not JSON, 422 (naming the fields) if it does not fit."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        bad_json = [e for e in errors if e["type"] == "json_invalid"]
        if bad_json:
            raise InvalidRequest(f"malformed JSON body: {bad_json[0]['msg']}", code="json_invalid") from None
        parts, allowed = [], sorted(model_cls.model_fields)
        for e in errors[:5]:
            where = ".".join(str(x) for x in e["loc"]) or "body"
            if e["type"] == "extra_forbidden":
                parts.append(f"unknown field {where!r} (allowed: {', '.join(allowed)})")
            else:
                parts.append(f"{where}: {e['msg']}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        first = ".".join(str(x) for x in errors[0]["loc"]) or None
        raise ValidationFailed("invalid request: " + "; ".join(parts) + more, param=first, code="invalid_value") from None


def check_strings(values: Sequence, what: str) -> None:
    """Every item a string that can be sent as UTF-8 (JSON from Python may carry lone surrogates)."""
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValidationFailed(f"{what}[{i}] must be a string, got {type(value).__name__}", param=what)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationFailed(f"{what}[{i}] is not valid Unicode text (lone surrogate)", param=what) from None


def check_sampling(req: _Sampling) -> None:
    """Refuse sampling options this greedy server cannot honour, instead of silently ignoring them."""
    if req.temperature not in (None, 0):
        raise InvalidRequest(f"temperature must be 0 (this server decodes greedily), got {req.temperature}", param="temperature")
    if req.top_p not in (None, 1):
        raise InvalidRequest(f"top_p must be 1 (greedy decoding), got {req.top_p}", param="top_p")
    if req.n not in (None, 1) or getattr(req, "best_of", None) not in (None, 1):
        raise InvalidRequest("n and best_of must be 1: greedy decoding gives one answer per prompt", param="n")
    if req.stream:
        raise InvalidRequest("stream=true is not supported; send stream=false", param="stream")
    if req.presence_penalty not in (None, 0) or req.frequency_penalty not in (None, 0):
        raise InvalidRequest("presence_penalty and frequency_penalty must be 0", param="presence_penalty")
    if req.logit_bias:
        raise InvalidRequest("logit_bias is not supported", param="logit_bias")
    if getattr(req, "suffix", None):
        raise InvalidRequest("suffix (insertion) is not supported", param="suffix")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
    return tuple(stops)


def classify_request(texts: Sequence[str], labels: Sequence[str], labels_only: bool, model: str | None = None) -> dict:
    body = {"texts": list(texts), "labels": list(labels), "labels_only": bool(labels_only)}
    return {"model": model, **body} if model else body


def classify_response(model_id: str, scores: np.ndarray, labels_only: bool, prompt_tokens: int,
                      texts: Sequence[str]) -> dict:
    """The answer to a classify request; ``predictions`` break exact ties by the texts
    (:func:`fedprompt.ties.pick_labels`), as every client does."""
    from fedprompt.ties import pick_labels

    return {
        "object": "classification",
        "model": model_id,
        "predictions": [int(i) for i in pick_labels(scores, texts)[0]],
        "logprobs": None if labels_only else [[float(v) for v in row] for row in scores],
        "usage": {"queries": int(scores.shape[0]), "prompt_tokens": int(prompt_tokens), "completion_tokens": 0},
    }
