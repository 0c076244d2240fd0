"""The shape of the composed config: the root node, and the section each of its keys holds.

Every section is declared once, by the dataclass that the code reads (``federation``:
:class:`fedprompt.runs.run_config.FederationConfig`, ``service``: :class:`fedprompt.blackbox.settings.ServiceConfig`,
``deploy``: :class:`fedprompt.commands.deploy.DeploySettings`, ``distill``: :class:`fedprompt.models.distill_config.DistillConfig`,
``transfer``: :class:`fedprompt.methods.post.config.TransferConfig`, ``method``: the config class of the method
that ``method.name`` names (``fedprompt.registry.METHODS``), ``privacy``: the class of the mechanism that
``privacy.name`` names (:data:`PRIVACY`)); the task, model and partition nodes are declared here.
:func:`check_schema` validates a composed config against :class:`RootSchema` with the one validator,
:func:`fedprompt.typed_config.from_node`: an unknown key anywhere (a typo in a yaml file,
``+federation.roundz=3``, a stale ``config.yaml``), a value of the wrong type or out of range is one clear
error before anything starts. Any new key in ``conf/`` needs its field in its section's dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Annotated, Any, Mapping

from omegaconf import DictConfig
from pydantic import PlainValidator

from fedprompt.blackbox.settings import ServiceConfig
from fedprompt.errors import ConfigError
from fedprompt.sections import DeploySettings, FederationConfig


@dataclass
class HubSchema:  # task.hf: the task's Hugging Face dataset
    path: str = ""
    name: str | None = None
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    splits: dict[str, str] = field(default_factory=dict)
    validation_size: int | None = None  # rows carved from hub train when splits.validation is "carve"


@dataclass
class TaskSchema:
    name: str = ""
    custom: bool = False
    labels: list[str] | None = None
    label_words: list[str] | None = None
    template: str = ""
    answer_prefix: str = ""
    manual_prompt: str = ""
    is_pair: bool = False
    path: str | None = None
    hf: HubSchema | None = None
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
    alpha: float | None = None
    classes_per_client: int | None = None
    min_size: int = 1
    k_shot: int | None = None

    def validate(self) -> None:
        from fedprompt.data.partition import SCHEMES

        if self.scheme not in SCHEMES:
            raise ConfigError(f"partition.scheme={self.scheme!r} is not one of {list(SCHEMES)}")
        if self.k_shot is not None and self.k_shot < 1:
            raise ConfigError(f"partition.k_shot must be >= 1 (or null for the whole train split), got {self.k_shot}")


ON_DEMAND_CLASSES = {"distill": "fedprompt.models.distill_config:DistillConfig",
                     "transfer": "fedprompt.methods.post.config:TransferConfig"}


def section(key: str, resolve: str) -> PlainValidator:
    """The validator of a root key whose section is declared by a class imported only when a config is checked
    (``resolve``: ``"module:Class"``, or ``"method"`` / ``"privacy"``: the class that the node's ``name`` registers)."""

    def check(node: Any) -> Any:
        from fedprompt.typed_config import from_node

        if resolve == "method":
            from fedprompt.registry import federated_method

            cls = federated_method(node.get("name") if isinstance(node, dict) else None).load("config")
        elif resolve == "privacy":
            cls = privacy_class(node.get("name") if isinstance(node, dict) else None)
        else:
            module, _, attribute = resolve.partition(":")
            cls = getattr(import_module(module), attribute)
        return from_node(cls, node, key)

    return PlainValidator(check)


@dataclass
class RootSchema:
    task: TaskSchema = field(default_factory=TaskSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    method: Annotated[Any, section("method", "method")] = None  # the config class of method.name (fedprompt.registry)
    privacy: Annotated[Any, section("privacy", "privacy")] = None  # the config class of privacy.name (PRIVACY below)
    distill: Annotated[Any, section("distill", ON_DEMAND_CLASSES["distill"])] = None  # `fedprompt distill`
    transfer: Annotated[Any, section("transfer", ON_DEMAND_CLASSES["transfer"])] = None  # `fedprompt transfer`
    deploy: DeploySettings = field(default_factory=DeploySettings)  # `fedprompt deploy`
    federation: FederationConfig = field(default_factory=FederationConfig)
    partition: PartitionSchema = field(default_factory=PartitionSchema)
    host: str = ""
    port: int = 0
    data_dir: str | None = None
    split: str = ""
    limit: int | None = None
    prompt: str | None = None
    calibrate: bool = False
    batch_size: int = 0
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True
    verbose: bool = False
    resume: bool = False

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (or null for the whole split), got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:  # numpy and datasets refuse other seeds, with a traceback mid-run
            raise ConfigError(f"seed must be in 0..{2**32 - 1}, got {self.seed}")


# Sections whose declaring module loads torch and a method's training stack: every command (and every compose)
# would pay seconds for it, so check_schema leaves them to the commands that read them unless asked
# (``sections``): ``fedprompt run`` and its apps check method and privacy (fedprompt.runs.run_config.validate_config),
# ``fedprompt distill`` and ``fedprompt transfer`` their own node, all with the same validator, first thing.
ON_DEMAND = ("method", "privacy", "distill", "transfer")


def check_schema(cfg: DictConfig | Mapping[str, Any], sections: tuple[str, ...] = ()) -> RootSchema:
    """Raise a one-line ConfigError for an unknown key, a value of the wrong type or out of range, anywhere
    in ``cfg`` (the :data:`ON_DEMAND` sections only when named in ``sections``); return the typed config."""
    from fedprompt.typed_config import from_node, plain

    data = dict(plain(cfg))
    for key in ON_DEMAND:
        if key not in sections:
            data.pop(key, None)
    return from_node(RootSchema, data, "")


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
    def from_dict(cls, node: Mapping[str, Any]) -> NoPrivacy:
        from fedprompt.typed_config import from_node

        return from_node(cls, node, "privacy")


PRIVACY: dict[str, str] = {
    "none": "fedprompt.schema:NoPrivacy",
}


def privacy_class(name: Any) -> type:
    if name not in PRIVACY:
        raise ConfigError(f"privacy.name={name!r} is not one of {sorted(PRIVACY)}")
    module, _, attribute = PRIVACY[str(name)].partition(":")
    return getattr(import_module(module), attribute)


def privacy_config(cfg: DictConfig) -> Any:
    """The typed, validated config of ``cfg.privacy`` (``none`` when the node is absent)."""
    from fedprompt.typed_config import from_node, plain_dict

    node = plain_dict(cfg.privacy) if cfg.get("privacy") is not None else {"name": "none"}
    return from_node(privacy_class(node.get("name")), node, "privacy")
