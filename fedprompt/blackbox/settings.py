"""Typed, validated views of the ``service`` config group (``conf/service/default.yaml``).

Validation happens here, before a model loads, so ``fedprompt serve service.limits.max_batch=0`` fails
in a second with a message naming the key.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedprompt.errors import ConfigError
from fedprompt.redact import REDACTED, SECRETS

LABEL_MODES = ("first_token", "echo")
KINDS = ("inprocess", "http", "openai")


def _service(cfg: Any) -> ServiceConfig:
    """The ``service`` node of a composed config, validated against its declaration (:class:`ServiceConfig`)."""
    from fedprompt.typed_config import from_node

    return from_node(ServiceConfig, cfg.get("service") if cfg is not None else None, "service")


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

    requests: int | None = None  # requests a key may send (null = unlimited)
    queries: int | None = None  # texts scored (null = unlimited)
    tokens: int | None = None  # prompt + completion tokens (null = unlimited)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{f.name} must be a non-negative integer or null (a budget), got {value!r}")


@dataclass(frozen=True)
class TlsConfig:
    """``service.tls``: serve HTTPS with this PEM certificate (chain) and key; null = plain HTTP."""

    certfile: str | None = None  # scripts/make-certs.sh makes them; `fedprompt deploy` sets both
    keyfile: str | None = None


@dataclass(frozen=True)
class BatchingConfig:
    """``service.batching``: dynamic batching, concurrent requests share forward passes."""

    batch_size: int = 16  # rows per forward pass (conf: ${batch_size})
    max_texts: int = 256  # texts merged into one scoring call
    wait_ms: float = 5.0  # how long to wait for more requests once one arrived


@dataclass(frozen=True)
class CacheConfig:
    """``service.cache``: LRU of (text, labels) -> log-probs on the server (and in-process client)."""

    enabled: bool = False  # false: no cache
    size: int = 50000  # rows kept


@dataclass(frozen=True)
class HttpClientConfig:
    """``service.client``: the http and openai clients."""

    timeout_s: float = 300.0  # a request's whole time
    connect_timeout_s: float = 5.0
    retries: int = 4  # on connection errors, 5xx and 429 with Retry-After; never on other 4xx
    backoff_s: float = 0.5  # exponential: 0.5, 1, 2, 4 ... capped at max_backoff_s
    max_backoff_s: float = 8.0
    chunk_size: int = 128  # texts per request (<= the server's limits.max_batch)
    max_prompts_per_request: int | None = None  # openai: prompts per /v1/completions request; null = several, one if refused
    ca_file: str | None = None  # PEM CA bundle that verifies an https:// service.url; null = the system's


@dataclass(frozen=True)
class OpenAIConfig:
    """``service.openai``: kind=openai, any OpenAI-compatible /v1/completions server."""

    model: str | None = None  # the server's model name; null = model.name
    label_mode: str = "first_token"  # first_token (top-k next-token logprobs) | echo (exact; needs prompt logprobs)
    top_logprobs: int = 20  # k; hosted OpenAI allows at most 5
    tokenizer: str | None = None  # optional tokenizer (registry name, HF id, folder) to find each label's first token exactly


@dataclass(frozen=True)
class ServiceConfig:
    """The ``service`` node (conf/service/default.yaml): the black-box LLM service, server and client side.
    :class:`ServerSettings` and :class:`ClientSettings` are the two views the code uses."""

    kind: str = "inprocess"  # methods' black box: inprocess | http (a `fedprompt serve`) | openai
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port
    url: str | None = None  # clients: the server's base URL; null = http://<host>:<port>
    api_key: str | None = None  # Bearer key; null = $FEDPROMPT_API_KEY (openai: or $OPENAI_API_KEY); run files hold ***
    api_keys_file: str | None = None  # server: one key a line, `<key> [name=alice] [requests=N] [queries=N] [tokens=N] [admin=true]`
    api_keys_env: str | None = "FEDPROMPT_API_KEYS"  # server: more keys, comma/space separated. No key anywhere = open server
    model_id: str | None = None  # the name in /v1/models and responses; null = model.name
    log_level: str = "warning"  # uvicorn's log level
    tls: TlsConfig = field(default_factory=TlsConfig)
    budget: Budget = field(default_factory=Budget)
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    client: HttpClientConfig = field(default_factory=HttpClientConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)


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
    def from_config(cls, cfg: Any) -> ServerSettings:
        """From a composed config (root, with ``service`` and ``model``)."""
        svc = _service(cfg)
        model_name = str(cfg.model.name) if cfg is not None and cfg.get("model") is not None else None
        return cls(
            host=svc.host,
            port=svc.port,
            model_id=svc.model_id or model_name,
            api_keys_file=svc.api_keys_file,
            api_keys_env=svc.api_keys_env or "FEDPROMPT_API_KEYS",
            budget=svc.budget,
            limits=svc.limits,
            batch_size=svc.batching.batch_size,
            max_texts=svc.batching.max_texts,
            wait_ms=svc.batching.wait_ms,
            cache_size=svc.cache.size if svc.cache.enabled else 0,
            log_level=svc.log_level or "warning",
            tls_certfile=svc.tls.certfile,
            tls_keyfile=svc.tls.keyfile,
        )


@dataclass(frozen=True)
class ClientSettings:
    """How a method reaches the black box (``service.kind``) and how network clients behave."""

    kind: str = "inprocess"
    url: str | None = None
    api_key: str | None = None
    timeout_s: float = 300.0  # a request's whole time
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
    def from_config(cls, cfg: Any) -> ClientSettings:
        svc = _service(cfg)
        url = svc.url or f"http://{svc.host}:{svc.port}"
        if not svc.url and not 0 <= svc.port <= 65535:
            raise ConfigError(f"service.port must be an integer in 0..65535 (the clients' URL is built from it), "
                              f"got {svc.port!r}; or give service.url")
        api_key = svc.api_key
        if api_key == REDACTED:  # a key given on the command line, moved to the environment: the clients read it there
            api_key, env = None, SECRETS["service.api_key"]
            if svc.kind in ("http", "openai") and not os.environ.get(env):  # e.g. a resume in a new shell
                raise ConfigError(f"service.api_key is *** (a command-line key, never written to a file) but ${env} "
                                  f"is not set here; give the key again with service.api_key=<key> or export {env}")
        return cls(
            kind=svc.kind or "inprocess",
            url=url,
            api_key=api_key,
            **asdict(svc.client),
            openai_model=svc.openai.model,
            label_mode=svc.openai.label_mode or "first_token",
            top_logprobs=svc.openai.top_logprobs,
            tokenizer=svc.openai.tokenizer,
        )
