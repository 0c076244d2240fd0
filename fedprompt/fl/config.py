"""The composed config on its way into the Flower apps, and the checks both sides run on it.

``fedprompt run`` resolves the Hydra config (interpolations, relative paths, the data folder from the
environment) and serializes it as JSON into ONE run-config key, ``fedprompt-config``; the ServerApp and
every ClientApp parse and re-validate it (:func:`config_from_run_config`), so the apps never depend on
the launcher's working directory or environment. An empty value (``flwr run .`` by hand) means the
defaults of ``conf/``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError

RUN_CONFIG_KEY = "fedprompt-config"


def serialize_config(cfg: DictConfig) -> str:
    """The resolved config as JSON, with every path made absolute (the apps run in another folder)."""
    data = OmegaConf.to_container(cfg, resolve=True)
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
    """Every check that needs neither data nor models: keys and types, method, privacy, federation,
    partition, service."""
    from fedprompt.blackbox.settings import ClientSettings
    from fedprompt.config import check_composed, validate_common
    from fedprompt.data.partition import SCHEMES
    from fedprompt.fl.methods import federated_method
    from fedprompt.schema import privacy_config

    check_composed(cfg)  # unknown keys anywhere, wrong types (the apps and `fedprompt resume` re-check here)
    validate_common(cfg)
    method_config(cfg)  # the method's from_dict: an unknown method, unknown keys and bad values are errors
    privacy = privacy_config(cfg).name
    supported = federated_method(cfg.method.name).privacy
    if privacy not in supported:
        raise ConfigError(f"method={cfg.method.name} implements privacy={' | '.join(supported)}, got privacy={privacy}")
    validate_federation(cfg.federation)
    if not 0 <= cfg.get("seed", 0) < 2**32:  # numpy and datasets refuse other seeds, with a traceback mid-run
        raise ConfigError(f"seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    part = cfg.partition
    if part.get("scheme") not in SCHEMES:
        raise ConfigError(f"partition.scheme={part.get('scheme')!r} is not one of {list(SCHEMES)}")
    if part.get("k_shot") is not None and int(part.k_shot) < 1:
        raise ConfigError(f"partition.k_shot must be >= 1 (or null for the whole train split), got {part.k_shot}")
    ClientSettings.from_config(cfg)  # service.kind and the client's network settings


# Upper bounds: a typo (rounds=1000000000) or a value no run can meet would otherwise start and run for ever.
MAX_COUNT = 100_000           # clients, rounds, replies, evaluation interval
MAX_EXAMPLES = 1_000_000_000  # example limits and the public pool
MAX_TIMEOUT_S = 30 * 24 * 3600


def validate_federation(fed: DictConfig) -> None:
    def within(key: str, low: int, high: float, optional: bool = False) -> None:
        value = fed.get(key)
        if value is None and optional:
            return
        # comparisons, not float(): nan fails both, and an int too large for a float still compares
        if value is None or isinstance(value, bool) or not low <= value <= high:
            upper = f" and <= {high}" if high < math.inf else ""
            null = " (or null)" if optional else ""
            raise ConfigError(f"federation.{key} must be >= {low}{upper}{null}, got {value}")

    for key in ("num_clients", "rounds", "min_train_clients", "min_replies", "eval_every"):
        within(key, 1, MAX_COUNT)
    within("client_cpus", 1, 1024)
    within("client_gpus", 0, 1024)
    within("round_timeout_s", 1, MAX_TIMEOUT_S)
    within("public_size", 0, MAX_EXAMPLES)
    within("eval_limit", 1, MAX_EXAMPLES, optional=True)
    within("reference_limit", 1, MAX_EXAMPLES, optional=True)
    within("eval_sample_seed", 0, math.inf, optional=True)  # numpy refuses a negative seed, mid-run
    within("superlink_port", 0, 65535)  # else the SuperLink fails to bind, after the run folder exists
    if not 0 < float(fed.fraction_train) <= 1:
        raise ConfigError(f"federation.fraction_train must be in (0, 1], got {fed.fraction_train}")
    sampled = min(int(fed.num_clients), max(math.ceil(float(fed.fraction_train) * int(fed.num_clients)),
                                            int(fed.min_train_clients)))
    if int(fed.min_replies) > sampled:
        raise ConfigError(f"federation.min_replies={fed.min_replies} but a round samples only {sampled} clients: every "
                          "round would be skipped; lower min_replies or raise fraction_train / min_train_clients")
    available = fed.get("min_available_clients")
    if available is not None and not 1 <= int(available) <= int(fed.num_clients):
        raise ConfigError(f"federation.min_available_clients must be in 1..num_clients={fed.num_clients} "
                          f"(or null for all of them), got {available}")
    from fedprompt.data.leakage import OVERLAP_POLICIES

    if fed.get("eval_overlap") not in OVERLAP_POLICIES:
        raise ConfigError(f"federation.eval_overlap must be one of {' | '.join(OVERLAP_POLICIES)}, got {fed.get('eval_overlap')!r}")
    # public_split == eval_split is allowed (stage 1 of the result protocol scores on validation, where the public
    # pool lives too): the pool is then drawn from that split minus the evaluation examples (fedprompt.fl.data).
    if fed.public_split == "train" and int(fed.public_size) > 0:
        raise ConfigError("federation.public_split=train would hand clients' training data to everyone; use validation")


def method_config(cfg: DictConfig):
    """The typed, validated config of ``cfg.method`` (e.g. a FedDTPTConfig)."""
    from fedprompt.fl.methods import federated_method

    method = cfg.get("method")
    return federated_method(None if method is None else method.get("name")).load("config").from_dict(method)
