"""The composed config on its way into the Flower apps, and the checks both sides run on it.

``fedprompt run`` resolves the Hydra config (interpolations, relative paths, the data folder from the
environment) and serializes it as JSON into ONE run-config key, ``fedprompt-config``; the ServerApp and
every ClientApp parse and re-validate it (:func:`config_from_run_config`), so the apps never depend on
the launcher's working directory or environment. An empty value (``flwr run .`` by hand) means the
defaults of ``conf/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError
from fedprompt.sections import MAX_COUNT, MAX_EXAMPLES, MAX_TIMEOUT_S, FederationConfig  # noqa: F401  (re-exported)
from fedprompt.typed_config import plain_dict

RUN_CONFIG_KEY = "fedprompt-config"


def serialize_config(cfg: DictConfig) -> str:
    """The resolved config as JSON, with every path made absolute (the apps run in another folder)."""
    data = plain_dict(cfg)
    data_dir = data.get("data_dir") or os.environ.get("FEDPROMPT_DATA_DIR")
    data["data_dir"] = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    if data.get("output_dir"):
        data["output_dir"] = str(Path(data["output_dir"]).expanduser().resolve())
    if (data.get("task") or {}).get("path"):
        data["task"]["path"] = str(Path(data["task"]["path"]).expanduser().resolve())
    client = (data.get("service") or {}).get("client") or {}
    if client.get("ca_file"):  # an https:// service with a private CA (fedprompt deploy)
        client["ca_file"] = str(Path(client["ca_file"]).expanduser().resolve())
    from fedprompt.models.registry import EMBEDDED

    method = data.get("method") or {}
    for node, key in ((data.get("model") or {}, "name"), (method.get("proposer") or {}, "model"),
                      (method.get("aggregate") or {}, "embedder"), (method, "model"), (method, "vocab_model"),
                      (method.get("privatize") or {}, "embedding")):
        name = node.get(key)
        if name and name not in EMBEDDED and Path(str(name)).expanduser().is_dir():  # a local folder, not a hub id
            node[key] = str(Path(str(name)).expanduser().resolve())
    return json.dumps(data, sort_keys=True)


_PARSED: dict[str, DictConfig] = {}


def config_from_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    """The config an app was started with, validated (cheap checks only); parsed once per process."""
    text = str(run_config.get(RUN_CONFIG_KEY) or "")
    if text not in _PARSED:
        if text:
            try:
                cfg = OmegaConf.create(json.loads(text))
            except (json.JSONDecodeError, ValueError) as err:
                raise ConfigError(f"run config {RUN_CONFIG_KEY!r} is not the JSON of a fedprompt config: {err}") from None
        else:
            from fedprompt.config import compose

            cfg = compose([])
        validate_config(cfg)
        _PARSED.clear()  # one run per process at a time: drop an older run's config
        _PARSED[text] = cfg
    return _PARSED[text]


def validate_config(cfg: DictConfig) -> None:
    """Every check that needs neither data nor models: keys, types and ranges of every section the run reads
    (method, privacy, federation, service, ...: fedprompt.schema), and the rules between sections."""
    from fedprompt.blackbox.settings import ClientSettings
    from fedprompt.config import check_composed, validate_common
    from fedprompt.registry import federated_method
    from fedprompt.schema import privacy_config

    check_composed(cfg, ("method", "privacy"))  # unknown keys anywhere, wrong types, ranges (apps and resume too)
    validate_common(cfg)
    method_config(cfg)  # the method's from_dict: an unknown method, unknown keys and bad values are errors
    privacy = privacy_config(cfg).name
    supported = federated_method(cfg.method.name).privacy
    if privacy not in supported:
        raise ConfigError(f"method={cfg.method.name} implements privacy={' | '.join(supported)}, got privacy={privacy}")
    ClientSettings.from_config(cfg)  # service.kind and the client's network settings


def validate_federation(fed: Any) -> FederationConfig:
    """The ``federation`` node, validated against :class:`FederationConfig` (fedprompt.typed_config.from_node)."""
    from fedprompt.typed_config import from_node

    return from_node(FederationConfig, fed, "federation")


def method_config(cfg: DictConfig):
    """The typed, validated config of ``cfg.method`` (e.g. a FedDTPTConfig)."""
    from fedprompt.registry import federated_method

    method = cfg.get("method")
    config_class: Any = federated_method(None if method is None else method.get("name")).load("config")  # a class
    return config_class.from_dict(method)
