"""``make_blackbox``: the black box a method should talk to, chosen by ``service.kind``."""

from __future__ import annotations

from typing import Any

from fedprompt.blackbox.base import BlackBoxLM
from fedprompt.blackbox.settings import ClientSettings, ServerSettings


def make_blackbox(cfg: Any = None, kind: str | None = None, *, model=None, tokenizer=None, **overrides) -> BlackBoxLM:
    """A :class:`BlackBoxLM` from a composed config (root node with ``service`` and ``model``).

    ``kind`` overrides ``service.kind``: ``inprocess`` (this process; pass an already loaded ``model``
    and ``tokenizer`` to share them, else ``model.name`` is loaded), ``http`` (a ``fedprompt serve`` at
    ``service.url``) or ``openai`` (any OpenAI-compatible server at ``service.url``, model
    ``service.openai.model``; at most ``service.client.max_prompts_per_request`` prompts a request, found
    out when null). ``overrides`` are passed to the client's constructor.
    """
    client = ClientSettings.from_config(cfg)
    kind = kind or client.kind
    if kind not in ("inprocess", "http", "openai"):
        raise ValueError(f"unknown black-box kind {kind!r}; choose inprocess, http or openai (service.kind)")
    network = dict(timeout_s=client.timeout_s, connect_timeout_s=client.connect_timeout_s, retries=client.retries,
                   backoff_s=client.backoff_s, max_backoff_s=client.max_backoff_s, ca_file=client.ca_file)
    url = client.url
    assert url is not None  # from_config always builds one (from service.host and port without service.url)
    if kind == "http":
        from fedprompt.blackbox.http_client import HttpBlackBox

        return HttpBlackBox(url, client.api_key, chunk_size=client.chunk_size, **{**network, **overrides})
    if kind == "openai":
        from fedprompt.blackbox.openai_client import OpenAICompatibleBlackBox

        name = client.openai_model or (str(cfg.model.name) if cfg is not None and cfg.get("model") else None)
        options: dict[str, Any] = dict(label_mode=client.label_mode, top_logprobs=client.top_logprobs,
                                       tokenizer=client.tokenizer, chunk_size=min(client.chunk_size, 64),
                                       max_prompts_per_request=client.max_prompts_per_request, **network)
        return OpenAICompatibleBlackBox(url, name, client.api_key, **{**options, **overrides})
    from fedprompt.blackbox.inprocess import InProcessBlackBox

    server = ServerSettings.from_config(cfg) if cfg is not None else ServerSettings()
    model_cfg = cfg.get("model") if cfg is not None else None
    if model is None:
        if model_cfg is None:
            raise ValueError("make_blackbox(kind='inprocess') needs a config with model.name or a loaded model")
        model = str(model_cfg.name)
    options = dict(device=model_cfg.get("device") if model_cfg else "auto", dtype=model_cfg.get("dtype") if model_cfg else "auto",
                   batch_size=server.batch_size, chunk_size=client.chunk_size, limits=server.limits,
                   budget=server.budget, cache_size=server.cache_size, model_id=server.model_id)
    return InProcessBlackBox(model, tokenizer, **{**options, **overrides})
