"""The shape of the composed config: every key ``conf/`` may hold, with its type (OmegaConf structured
configs). :func:`check_schema` merges a composed config into it, so an unknown key anywhere (a typo in a
yaml file, ``+federation.roundz=3``, a stale ``config.yaml``) or a value of the wrong type is one clear
error before anything starts. Defaults live in ``conf/``, not here: this file only names keys and types.

Some nodes are free-form here because their keys are validated strictly by their own config class:
``method`` (each option has its own keys; ``fedprompt.fl.methods``: ``from_dict`` of the method's
config), ``privacy`` (likewise, :data:`PRIVACY` below), and the nodes of commands that validate their
own (``distill``, ``transfer``, ``deploy``). Any other new key in ``conf/`` needs its field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError


@dataclass
class HubSchema:  # task.hf: the task's Hugging Face dataset
    path: str = ""
    name: Optional[str] = None
    text: str = "text"
    text_pair: Optional[str] = None
    label: str = "label"
    splits: Dict[str, str] = field(default_factory=dict)
    validation_size: Optional[int] = None  # rows carved from hub train when splits.validation is "carve"


@dataclass
class TaskSchema:
    name: str = ""
    custom: bool = False
    labels: Optional[List[str]] = None
    label_words: Optional[List[str]] = None
    template: str = ""
    answer_prefix: str = ""
    manual_prompt: str = ""
    is_pair: bool = False
    path: Optional[str] = None
    hf: Optional[HubSchema] = None
    calibration: str = "none"  # none | mean (fedprompt.models.calibration); absent: none
    calibration_examples: int = 64


@dataclass
class ModelSchema:
    name: str = ""
    device: str = "auto"
    dtype: str = "auto"
    chat_format: str = ""


@dataclass
class PartitionSchema:
    scheme: str = ""
    alpha: Optional[float] = None
    classes_per_client: Optional[int] = None
    min_size: int = 1
    k_shot: Optional[int] = None


@dataclass
class FederationSchema:
    num_clients: int = 0
    rounds: int = 0
    fraction_train: float = 1.0
    min_train_clients: int = 1
    min_replies: int = 1
    min_available_clients: Optional[int] = None
    client_cpus: int = 1
    client_gpus: float = 0.0
    round_timeout_s: float = 0.0
    eval_split: str = ""
    eval_limit: Optional[int] = None
    eval_sample_seed: Optional[int] = None
    eval_every: int = 1
    eval_references: bool = True
    reference_limit: Optional[int] = None
    eval_overlap: str = ""
    public_split: str = ""
    public_size: int = 0
    audit_replies: bool = False
    superlink_port: int = 0


@dataclass
class BudgetSchema:
    requests: Optional[int] = None
    queries: Optional[int] = None
    tokens: Optional[int] = None


@dataclass
class LimitsSchema:
    max_batch: int = 0
    max_labels: int = 0
    max_prompt_tokens: int = 0
    max_label_tokens: int = 0
    max_request_tokens: int = 0
    max_new_tokens: int = 0
    max_logprobs: int = 0
    max_request_bytes: int = 0
    request_timeout_s: float = 0.0
    max_queue: int = 0
    max_connections: int = 0
    header_timeout_s: float = 0.0
    body_timeout_s: float = 0.0
    keep_alive_s: float = 0.0
    max_echo_mb: float = 0.0
    max_logprob_entries: int = 0


@dataclass
class BatchingSchema:
    batch_size: int = 0
    max_texts: int = 0
    wait_ms: float = 0.0


@dataclass
class CacheSchema:
    enabled: bool = False
    size: int = 0


@dataclass
class HttpClientSchema:
    timeout_s: float = 0.0
    connect_timeout_s: float = 0.0
    retries: int = 0
    backoff_s: float = 0.0
    max_backoff_s: float = 0.0
    chunk_size: int = 0
    max_prompts_per_request: Optional[int] = None
    ca_file: Optional[str] = None


@dataclass
class TlsSchema:
    certfile: Optional[str] = None
    keyfile: Optional[str] = None


@dataclass
class OpenAISchema:
    model: Optional[str] = None
    label_mode: str = ""
    top_logprobs: int = 0
    tokenizer: Optional[str] = None


@dataclass
class ServiceSchema:
    kind: str = ""
    host: str = ""
    port: int = 0
    url: Optional[str] = None
    api_key: Optional[str] = None
    api_keys_file: Optional[str] = None
    api_keys_env: Optional[str] = None
    model_id: Optional[str] = None
    log_level: str = ""
    tls: TlsSchema = field(default_factory=TlsSchema)
    budget: BudgetSchema = field(default_factory=BudgetSchema)
    limits: LimitsSchema = field(default_factory=LimitsSchema)
    batching: BatchingSchema = field(default_factory=BatchingSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    client: HttpClientSchema = field(default_factory=HttpClientSchema)
    openai: OpenAISchema = field(default_factory=OpenAISchema)


@dataclass
class RootSchema:
    task: TaskSchema = field(default_factory=TaskSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    service: ServiceSchema = field(default_factory=ServiceSchema)
    method: Dict[str, Any] = field(default_factory=dict)  # the method's own config class validates it
    privacy: Dict[str, Any] = field(default_factory=dict)  # the mechanism's own config class validates it
    distill: Dict[str, Any] = field(default_factory=dict)  # `fedprompt distill`: its own config class validates it
    transfer: Dict[str, Any] = field(default_factory=dict)  # `fedprompt transfer`: likewise
    deploy: Dict[str, Any] = field(default_factory=dict)  # `fedprompt deploy`: likewise
    federation: FederationSchema = field(default_factory=FederationSchema)
    partition: PartitionSchema = field(default_factory=PartitionSchema)
    host: str = ""
    port: int = 0
    data_dir: Optional[str] = None
    split: str = ""
    limit: Optional[int] = None
    prompt: Optional[str] = None
    calibrate: bool = False
    batch_size: int = 0
    seed: int = 0
    output_dir: Optional[str] = None
    progress: bool = True
    verbose: bool = False
    resume: bool = False


def check_schema(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise a one-line ConfigError for an unknown key or a value of the wrong type, anywhere in ``cfg``."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    try:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        OmegaConf.merge(OmegaConf.structured(RootSchema), data)
    except ConfigKeyError as err:
        parent = err.full_key.rpartition(".")[0]
        known = sorted(err.parent_node.keys()) if err.parent_node is not None else []
        where = f"the {parent} node" if parent else "the root config"
        raise ConfigError(f"unknown config key {err.full_key!r}: {where} takes {known}; fix the override or the "
                          "yaml file in conf/") from None
    except ValidationError as err:
        message = str(err.msg).splitlines()[0]
        if "converted to Integer" in message:  # 1e20 or 3.0: refused rather than truncated
            message += "; give a whole number, e.g. 3 (not 3.0 or 1e3)"
        raise ConfigError(f"bad value for {err.full_key}: {message}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {str(err).splitlines()[0]}") from None


# --- privacy: one mechanism per run, chosen by privacy.name (conf/privacy/<name>.yaml) -------------------------
#
# A mechanism registers "name": "module:Class" here; the class's ``from_dict(node)`` validates the whole
# privacy node (unknown keys are errors) and returns its typed config. A federated method lists the
# mechanisms it implements in ``FederatedMethod.privacy`` (fedprompt/fl/methods.py).


@dataclass(frozen=True)
class NoPrivacy:
    """``privacy=none``: no formal mechanism beyond what the method itself keeps local."""

    name: str = "none"

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> "NoPrivacy":
        extra = sorted(set(node) - {"name"})
        if extra:
            raise ConfigError(f"privacy=none takes no settings, got {extra}; choose a mechanism with privacy=<name>")
        return cls()


PRIVACY: dict[str, str] = {
    "none": "fedprompt.schema:NoPrivacy",
}


def privacy_config(cfg: DictConfig) -> Any:
    """The typed, validated config of ``cfg.privacy`` (``none`` when the node is absent)."""
    node = OmegaConf.to_container(cfg.privacy, resolve=True) if cfg.get("privacy") is not None else {"name": "none"}
    name = node.get("name")
    if name not in PRIVACY:
        raise ConfigError(f"privacy.name={name!r} is not one of {sorted(PRIVACY)}")
    module, _, attribute = PRIVACY[str(name)].partition(":")
    return getattr(import_module(module), attribute).from_dict(node)
