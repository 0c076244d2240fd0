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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError

RUN_CONFIG_KEY = "fedprompt-config"
T = TypeVar("T")


def once_per_run(cache: dict[str, T], run_config: Mapping[str, Any], build: Callable[[], T],
                 release: Callable[[T], None] | None = None) -> T:
    """What a client process builds once per run and reuses every round (Ray keeps its actors alive).

    ``cache`` is the caller's module-level dict, keyed by the run's serialized config; a new run in the
    same process releases and drops the previous run's object first (one run per process at a time).
    """
    key = str(run_config.get(RUN_CONFIG_KEY) or "")
    if key not in cache:
        for old in cache.values():
            if release is not None:
                release(old)
        cache.clear()
        cache[key] = build()
    return cache[key]


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
    """Every check that needs neither data nor models: keys, types and ranges of every section the run reads
    (method, privacy, federation, service, ...: fedprompt.schema), and the rules between sections."""
    from fedprompt.blackbox.settings import ClientSettings
    from fedprompt.config import check_composed, validate_common
    from fedprompt.fl.methods import federated_method
    from fedprompt.schema import privacy_config

    check_composed(cfg, ("method", "privacy"))  # unknown keys anywhere, wrong types, ranges (apps and resume too)
    validate_common(cfg)
    method_config(cfg)  # the method's from_dict: an unknown method, unknown keys and bad values are errors
    privacy = privacy_config(cfg).name
    supported = federated_method(cfg.method.name).privacy
    if privacy not in supported:
        raise ConfigError(f"method={cfg.method.name} implements privacy={' | '.join(supported)}, got privacy={privacy}")
    ClientSettings.from_config(cfg)  # service.kind and the client's network settings


# Upper bounds: a typo (rounds=1000000000) or a value no run can meet would otherwise start and run for ever.
MAX_COUNT = 100_000           # clients, rounds, replies, evaluation interval
MAX_EXAMPLES = 1_000_000_000  # example limits and the public pool
MAX_TIMEOUT_S = 30 * 24 * 3600


@dataclass(frozen=True)
class FederationConfig:
    """The ``federation`` node (conf/federation/default.yaml): a Flower simulation's clients, rounds, sampling
    and evaluation. Every method's server honours every key alike (fedprompt.fl.rounds.RoundDriver)."""

    num_clients: int = 10  # simulated SuperNodes (flwr num-supernodes); client i holds partition i
    rounds: int = 3  # federated rounds; round 0 is the seed prompt, evaluated before any training
    fraction_train: float = 1.0  # share of clients sampled per round (FedDTPT paper: full participation)
    min_train_clients: int = 1  # at least this many clients per round, whatever fraction_train gives
    min_replies: int = 1  # valid replies a round needs; fewer (failed, timed-out, lost clients): round skipped, prompt kept
    min_available_clients: Optional[int] = None  # SuperNodes online before a round samples (null = num_clients); lower = survive lost ones
    client_cpus: int = 1  # Ray CPUs per ClientApp: 1 on a 2-core machine lets two clients search at once
    client_gpus: float = 0.0  # share of a GPU per ClientApp (e.g. 0.25 = four clients per GPU)
    round_timeout_s: float = 3600.0  # how long the server waits for the round's replies
    eval_split: str = "test"  # the server evaluates the global prompt on this split after every round
    eval_limit: Optional[int] = None  # only N examples of eval_split (null = all of them): the first N, or a seeded sample
    eval_sample_seed: Optional[int] = None  # null = the first eval_limit examples; an int = a seeded sample of eval_limit (AG News: 2,000 of 7,600)
    eval_every: int = 1  # score the global prompt every k rounds (round 0 and the last round always)
    eval_references: bool = True  # also score the untuned references (manual prompt, zero-shot) on the same examples
    reference_limit: Optional[int] = 500  # validation examples that decide the reference (the better of manual and zero-shot); null = all
    eval_overlap: str = "refuse"  # a learning set (train sample, public pool, ...) sharing content with the evaluation examples: refuse = stop before launch; exclude = drop those rows from the learning sets first
    public_split: str = "validation"  # the small public set every client may use (never a client's data, never eval_split's examples)
    public_size: int = 64  # public pool (class-balanced); each search batch draws method.search.public_batch_size of it
    audit_replies: bool = False  # every method: write every client-to-server message, as received, to <run folder>/replies.jsonl
    superlink_port: int = 0  # the private local SuperLink's port on 127.0.0.1 (0 = any free port)

    def validate(self) -> None:
        def within(key: str, low: int, high: float, optional: bool = False) -> None:
            value = getattr(self, key)
            if value is None and optional:
                return
            # comparisons, not float(): nan fails both, and an int too large for a float still compares
            if value is None or not low <= value <= high:
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
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"federation.fraction_train must be in (0, 1], got {self.fraction_train}")
        sampled = min(self.num_clients, max(math.ceil(self.fraction_train * self.num_clients), self.min_train_clients))
        if self.min_replies > sampled:
            raise ConfigError(f"federation.min_replies={self.min_replies} but a round samples only {sampled} clients: "
                              "every round would be skipped; lower min_replies or raise fraction_train / "
                              "min_train_clients")
        available = self.min_available_clients
        if available is not None and not 1 <= available <= self.num_clients:
            raise ConfigError(f"federation.min_available_clients must be in 1..num_clients={self.num_clients} "
                              f"(or null for all of them), got {available}")
        from fedprompt.data.leakage import OVERLAP_POLICIES

        if self.eval_overlap not in OVERLAP_POLICIES:
            raise ConfigError(f"federation.eval_overlap must be one of {' | '.join(OVERLAP_POLICIES)}, got "
                              f"{self.eval_overlap!r}")
        # public_split == eval_split is allowed (stage 1 of the result protocol scores on validation, where the
        # public pool lives too): the pool is then drawn from that split minus the evaluation examples (fl.data).
        if self.public_split == "train" and self.public_size > 0:
            raise ConfigError("federation.public_split=train would hand clients' training data to everyone; use "
                              "validation")


def validate_federation(fed: Any) -> FederationConfig:
    """The ``federation`` node, validated against :class:`FederationConfig` (fedprompt.typed_config.from_node)."""
    from fedprompt.typed_config import from_node

    return from_node(FederationConfig, fed, "federation")


def method_config(cfg: DictConfig):
    """The typed, validated config of ``cfg.method`` (e.g. a FedDTPTConfig)."""
    from fedprompt.fl.methods import federated_method

    method = cfg.get("method")
    return federated_method(None if method is None else method.get("name")).load("config").from_dict(method)
