"""Typed, validated views of the ``service`` config group (``conf/service/default.yaml``).

Validation happens here, before a model loads, so ``fedprompt serve service.limits.max_batch=0`` fails
in a second with a message naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from fedprompt.errors import ConfigError
from fedprompt.redact import REDACTED, SECRETS

LABEL_MODES = ("first_token", "echo")
KINDS = ("inprocess", "http", "openai")


def _node(cfg: Any, key: str) -> Mapping:
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get(key) if cfg is not None else None
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _build(cls, values: Mapping, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    return cls(**{k: v for k, v in values.items() if k in known})


def _positive(where: str, **values) -> None:
    for name, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request over one gets 413 (sizes) or 422 (values) before any model work."""

    max_batch: int = 256             # texts (classify) or prompts (completions) per request
    max_labels: int = 64             # candidate labels per classify request
    max_prompt_tokens: int = 2048    # tokens of one text or prompt
    max_label_tokens: int = 16       # tokens of one candidate label
    max_request_tokens: int = 131072  # all tokens the model reads for one request (bounds its time)
    max_new_tokens: int = 64         # completions: max_tokens ceiling
    max_logprobs: int = 20           # completions: top-k alternatives per position
    max_request_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 300.0  # queue wait + compute; past it the server answers 503 + Retry-After
    max_queue: int = 4096            # texts waiting for the model; past it new requests get 429 + Retry-After
    # Abuse limits (docs/blackbox.md, "Limits and abuse"): they bound what one client can hold of the server.
    max_connections: int = 64        # connections served at once; more are answered 429 + Retry-After and closed
    header_timeout_s: float = 10.0   # the request line and headers must arrive within this (slowloris)
    body_timeout_s: float = 30.0     # the whole body must arrive within this after the headers; else 408
    keep_alive_s: float = 5.0        # an idle keep-alive connection is closed after this
    max_echo_mb: float = 512.0       # echo: logits one forward pass may hold (positions x vocab x 8 bytes)
    max_logprob_entries: int = 100_000  # top log-probs in one answer: prompts x positions x logprobs (~250 B each)

    def __post_init__(self) -> None:
        _positive("service.limits", **{f.name: getattr(self, f.name) for f in fields(self)})
        if self.max_logprobs > 20:
            raise ConfigError(f"service.limits.max_logprobs is at most 20 (the OpenAI protocol's ceiling), got {self.max_logprobs}")


@dataclass(frozen=True)
class Budget:
    """A key's lifetime allowance; ``None`` means unlimited. Tokens = prompt + completion tokens."""

    requests: int | None = None
    queries: int | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"budget {f.name} must be a non-negative integer or null, got {value!r}")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str | None = None
    api_keys_file: str | None = None
    api_keys_env: str = "FEDPROMPT_API_KEYS"
    budget: Budget = field(default_factory=Budget)
    limits: Limits = field(default_factory=Limits)
    batch_size: int = 16      # rows per forward pass
    max_texts: int = 256      # texts merged from queued requests into one scoring call
    wait_ms: float = 5.0      # how long the worker waits for more requests before a merged call
    cache_size: int = 0       # LRU rows (text, labels) -> log-probs; 0 = off
    log_level: str = "warning"
    tls_certfile: str | None = None  # PEM certificate (chain) and key: serve HTTPS; both or neither
    tls_keyfile: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"service.port must be an integer in 0..65535 (0 = any free port), got {self.port!r}")
        if not self.host or not isinstance(self.host, str):
            raise ConfigError(f"service.host must be a host name or IP address, got {self.host!r}")
        _positive("service.batching", batch_size=self.batch_size, max_texts=self.max_texts)
        if not isinstance(self.wait_ms, (int, float)) or self.wait_ms < 0:
            raise ConfigError(f"service.batching.wait_ms must be >= 0, got {self.wait_ms!r}")
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ConfigError(f"service.cache.size must be an integer >= 0, got {self.cache_size!r}")
        if self.api_keys_file is not None and not os.path.isfile(os.path.expanduser(str(self.api_keys_file))):
            raise ConfigError(f"service.api_keys_file {self.api_keys_file!r} does not exist")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ConfigError("service.tls needs both certfile and keyfile (HTTPS), or neither (plain HTTP)")
        for key, path in (("certfile", self.tls_certfile), ("keyfile", self.tls_keyfile)):
            if path is not None and not os.path.isfile(os.path.expanduser(str(path))):
                raise ConfigError(f"service.tls.{key} {path!r} does not exist (scripts/make-certs.sh makes one)")

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"

    @classmethod
    def from_config(cls, cfg: Any) -> "ServerSettings":
        """From a composed config (root, with ``service`` and ``model``)."""
        svc = _node(cfg, "service")
        batching, cache = dict(svc.get("batching") or {}), dict(svc.get("cache") or {})
        tls = dict(svc.get("tls") or {})
        model_name = str(cfg.model.name) if cfg is not None and cfg.get("model") is not None else None
        return cls(
            host=svc.get("host", "127.0.0.1"),
            port=svc.get("port", 8000),
            model_id=svc.get("model_id") or model_name,
            api_keys_file=svc.get("api_keys_file"),
            api_keys_env=svc.get("api_keys_env") or "FEDPROMPT_API_KEYS",
            budget=_build(Budget, svc.get("budget") or {}, "service.budget"),
            limits=_build(Limits, svc.get("limits") or {}, "service.limits"),
            batch_size=batching.get("batch_size", 16),
            max_texts=batching.get("max_texts", 256),
            wait_ms=batching.get("wait_ms", 5.0),
            cache_size=int(cache.get("size", 0)) if cache.get("enabled", False) else 0,
            log_level=str(svc.get("log_level") or "warning"),
            tls_certfile=tls.get("certfile"),
            tls_keyfile=tls.get("keyfile"),
        )


@dataclass(frozen=True)
class ClientSettings:
    """How a method reaches the black box (``service.kind``) and how network clients behave."""

    kind: str = "inprocess"
    url: str | None = None
    api_key: str | None = None
    timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    chunk_size: int = 128          # texts per HTTP request
    # openai: prompts per /v1/completions request; None = find out (several, then one if the server refuses)
    max_prompts_per_request: int | None = None
    ca_file: str | None = None     # PEM CA bundle that verifies an https:// service (None: the system's)
    openai_model: str | None = None
    label_mode: str = "first_token"
    top_logprobs: int = 20
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"service.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(f"service.openai.label_mode must be one of {list(LABEL_MODES)}, got {self.label_mode!r}")
        _positive("service.client", timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s,
                  chunk_size=self.chunk_size, max_backoff_s=self.max_backoff_s)
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"service.client.retries must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.backoff_s, (int, float)) or self.backoff_s < 0:
            raise ConfigError(f"service.client.backoff_s must be >= 0, got {self.backoff_s!r}")
        if self.max_prompts_per_request is not None and (
                isinstance(self.max_prompts_per_request, bool) or not isinstance(self.max_prompts_per_request, int)
                or self.max_prompts_per_request < 1):
            raise ConfigError("service.client.max_prompts_per_request must be an integer >= 1 or null (find out), "
                              f"got {self.max_prompts_per_request!r}")
        if not isinstance(self.top_logprobs, int) or not 1 <= self.top_logprobs <= 20:
            raise ConfigError(f"service.openai.top_logprobs must be an integer in 1..20, got {self.top_logprobs!r}")
        if self.ca_file is not None and not os.path.isfile(os.path.expanduser(str(self.ca_file))):
            raise ConfigError(f"service.client.ca_file {self.ca_file!r} does not exist")

    @classmethod
    def from_config(cls, cfg: Any) -> "ClientSettings":
        svc = _node(cfg, "service")
        client, openai = dict(svc.get("client") or {}), dict(svc.get("openai") or {})
        port = svc.get("port", 8000)
        if not svc.get("url") and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
            raise ConfigError(f"service.port must be an integer in 0..65535 (the clients' URL is built from it), "
                              f"got {port!r}; or give service.url")
        url = svc.get("url") or f"http://{svc.get('host', '127.0.0.1')}:{port}"
        api_key = svc.get("api_key")
        if api_key == REDACTED:  # a key given on the command line, moved to the environment: the clients read it there
            api_key, env = None, SECRETS["service.api_key"]
            if svc.get("kind") in ("http", "openai") and not os.environ.get(env):  # e.g. a resume in a new shell
                raise ConfigError(f"service.api_key is *** (a command-line key, never written to a file) but ${env} "
                                  f"is not set here; give the key again with service.api_key=<key> or export {env}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(client) - known)
        if extra:
            raise ConfigError(f"unknown key(s) {extra} in service.client; known: {sorted(known)}")
        return cls(
            kind=str(svc.get("kind") or "inprocess"),
            url=url,
            api_key=api_key,
            **client,
            openai_model=openai.get("model"),
            label_mode=str(openai.get("label_mode") or "first_token"),
            top_logprobs=openai.get("top_logprobs", 20),
            tokenizer=openai.get("tokenizer"),
        )
