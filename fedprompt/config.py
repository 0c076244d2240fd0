"""Compose the Hydra config (``conf/``) from command-line overrides, and validate it up front.

``model=<name>`` and ``task=<name>`` accept more than the files in ``conf/``: a model that has no
config file is treated as a Hugging Face id or local folder (``conf/model/hf.yaml``), a task that has
none as a folder in the shared format under the data folder (``conf/task/custom.yaml``).

The user's config folder (:func:`user_conf_dir`: ``$FEDPROMPT_CONF_DIR``, else ``$XDG_CONFIG_HOME/fedprompt``,
i.e. ``~/.config/fedprompt``) adds config files of the user's own, in the same layout as ``conf/``
(``task/<name>.yaml``, ``model/<name>.yaml``, ...): ``fedprompt task init`` writes there, and every command
finds them as if they were in ``conf/`` (they are on Hydra's search path). A ``$FEDPROMPT_CONF_DIR`` that
holds a ``config.yaml`` of its own is instead a whole replacement of ``conf/`` (a copy to edit).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence, cast

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError, FedPromptError

CONF_ENV = "FEDPROMPT_CONF_DIR"


PACKAGE_CONF = Path(__file__).resolve().parents[1] / "conf"


def conf_dir() -> Path:
    """The primary config folder: ``$FEDPROMPT_CONF_DIR`` when it holds a ``config.yaml`` (a whole copy of
    ``conf/``), else the ``conf/`` folder beside the package (the repository's)."""
    env = os.environ.get(CONF_ENV)
    if env and (Path(env).expanduser() / "config.yaml").is_file():
        return Path(env).expanduser()
    if not (PACKAGE_CONF / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {PACKAGE_CONF}; set {CONF_ENV} to a copy of fedprompt's conf/ folder")
    return PACKAGE_CONF


def user_conf_path() -> Path:
    """Where the user's config folder is, whether or not it exists: ``$FEDPROMPT_CONF_DIR``, else
    ``$XDG_CONFIG_HOME/fedprompt`` (``~/.config/fedprompt``). ``fedprompt task init`` writes here."""
    env = os.environ.get(CONF_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "fedprompt"


def user_conf_dir() -> Path | None:
    """The user's config folder to search after ``conf/``; None when there is none (or it is the primary
    folder itself, a whole copy of ``conf/``). A ``$FEDPROMPT_CONF_DIR`` that does not exist is an error: a
    typo would otherwise hide the user's configs without a word."""
    path = user_conf_path()
    if (path / "config.yaml").is_file():
        return None
    if not path.is_dir():
        if os.environ.get(CONF_ENV):
            raise ConfigError(f"{CONF_ENV}={str(path)!r} is not a folder; create it (fedprompt task init does) or "
                              "unset it")
        return None
    return path


def search_path_overrides() -> list[str]:
    """The Hydra override that puts the user's config folder on the search path (none without one).

    Hydra looks in ``conf/`` first, so a user file named like one of ``conf/``'s would be ignored without a
    word: refused instead."""
    user = user_conf_dir()
    if user is None:
        return []
    primary = conf_dir()
    shadowed = sorted(str(p.relative_to(user)) for p in user.glob("*/*.yaml") if (primary / p.relative_to(user)).is_file())
    if shadowed:
        raise ConfigError(f"{user}: {', '.join(shadowed)} would be ignored: conf/ has files of the same name; "
                          "rename yours (e.g. task/<name>.yaml, used as task=<name>)")
    if "'" in str(user):
        raise ConfigError(f"user config folder {str(user)!r}: a quote in its path cannot be passed to Hydra; move it")
    return [f"hydra.searchpath=['file://{user.resolve()}']"]


def group_options(group: str) -> list[str]:
    """The config files of ``group`` (``task``, ``model``, ...): ``conf/``'s and the user's."""
    folders = [conf_dir(), *filter(None, [user_conf_dir()])]
    return sorted({p.stem for folder in folders for p in (folder / group).glob("*.yaml")})


# group -> (the option that takes any name, the key that holds the name)
SHORTHANDS = {"model": ("hf", "model.name"), "task": ("custom", "task.name")}


def rewrite_shorthands(overrides: Sequence[str]) -> list[str]:
    """``model=<HF id or folder>`` -> ``model=hf model.name=<it>``; ``task=<folder>`` -> ``task=custom
    task.name=<it>``. A sweep (``model=a,b``) is rewritten when none of its values has a config file."""
    out: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in SHORTHANDS:
            out.append(item)
            continue
        option, name_key = SHORTHANDS[key]
        values = value.split(",")  # a plain choice sweep; other sweep syntax goes to Hydra as it is
        known = [v for v in values if v in group_options(key)]
        if len(known) == len(values) or "(" in value:
            out.append(item)
        elif not known:
            out += [f"{key}={option}", f"{name_key}={value}"]
        else:
            raise ConfigError(f"{item}: a sweep cannot mix {key} files ({', '.join(known)}) with other names; "
                              f"sweep over one kind, or use {key}={option} {name_key}=<a>,<b>")
    return out


# Sections whose defaults come from their declaration, not from conf/: group -> (the dataclass, where its node
# goes). Their conf/ files list `declared` first in their defaults list and hold only what differs. Every
# declaring module here imports no torch (the methods' config modules, fedprompt.models.distill_config): composing
# a config stays fast.
DECLARED = {"federation": ("fedprompt.sections:FederationConfig", "federation"),
            "service": ("fedprompt.blackbox.settings:ServiceConfig", "service"),
            "deploy": ("fedprompt.sections:DeploySettings", "deploy"),
            "distill": ("fedprompt.models.distill_config:DistillConfig", "distill"),
            "transfer": ("fedprompt.methods.post.config:TransferConfig", "transfer")}


def declared_sections() -> list[tuple[str, str, str, str]]:
    """Every declared section as (ConfigStore group, name, the dataclass, package). :data:`DECLARED` as
    ``<group>/declared``, and each method of fedprompt.registry.METHODS as ``method/declared/<name>`` (its
    conf/method/<name>.yaml lists ``declared/<name>`` first)."""
    from fedprompt.registry import METHODS

    out = [(group, "declared", path, package) for group, (path, package) in DECLARED.items()]
    return out + [("method/declared", name, method.config, "method") for name, method in METHODS.items()]


def declared_node(path: str) -> dict:
    """The declared defaults of the dataclass at ``path`` (``"module:Class"``), as plain values."""
    from dataclasses import asdict
    from importlib import import_module

    module, _, name = path.partition(":")
    return asdict(getattr(import_module(module), name)())


def register_declared_defaults() -> None:
    """Put the declared defaults of :func:`declared_sections` in Hydra's ConfigStore (plain values: the one
    validator, fedprompt.typed_config, checks types after composition), so that ``federation.rounds=5`` or
    ``method.search.budget=300`` overrides a key that no yaml file repeats."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, name, path, package in declared_sections():
        store.store(group=group, name=name, node=declared_node(path), package=package)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed config for ``overrides`` (Hydra syntax), with unknown keys reported clearly."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_declared_defaults()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name=config_name,
                                overrides=rewrite_shorthands(overrides) + search_path_overrides())
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
        raise ConfigError(f"bad override in {list(overrides)}: {message}") from None
    check_composed(cfg)
    return cfg


def merge(cfg: DictConfig, *others: Any) -> DictConfig:
    """``OmegaConf.merge(cfg, *others)``: a copy of ``cfg``, so a DictConfig (typed as any config by OmegaConf)."""
    return cast(DictConfig, OmegaConf.merge(cfg, *others))


def check_composed(cfg: DictConfig, sections: tuple[str, ...] = ()) -> None:
    """No required value left unset, no unknown key, no value of the wrong type or out of range
    (fedprompt.schema; ``sections``: the on-demand sections to check too, e.g. ``("method", "privacy")``)."""
    from fedprompt.schema import check_schema

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config values: {missing}; set them as key=value")
    check_schema(cfg, sections)


def check_writable_dir(path: str | os.PathLike, key: str = "output_dir") -> None:
    """Refuse a folder that could not be created or written in, before anything starts; creates nothing, so a
    run refused later for another reason leaves no empty folder behind."""
    folder = Path(path).expanduser()
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # "." or "/" at the latest
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {existing} is a file, not a folder; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only file system, even for root
        raise ConfigError(f"{key}={str(path)!r}: cannot write in {existing} (permission denied or read-only file "
                          f"system); choose a writable {key}")


def make_dir(path: Path, key: str = "output_dir") -> Path:
    """``mkdir -p`` with its failure in one line (a folder checked writable can still fail: full disk, a race)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}={str(path)!r}: cannot create it ({err.strerror}); choose a writable {key}") from None
    return path


def validate_common(cfg: DictConfig) -> None:
    """Checks every command shares; cheap, before any model or data is loaded."""
    from fedprompt.models.registry import check_model_name, resolve_device, resolve_dtype

    check_model_name(str(cfg.model.name))
    resolve_dtype(cfg.model.get("dtype"), resolve_device(cfg.model.get("device")))
    if cfg.task.name in (None, "???"):
        raise ConfigError("no task given; use task=<name>, e.g. task=sst2")
    from fedprompt.data.loading import check_task_name

    check_task_name(cfg.task.name)


def output_dir(cfg: DictConfig, command: str) -> Path:
    """A command's run folder, created: ``output_dir=`` or ``outputs/<command>/<time>-<task>-<split>``."""
    if cfg.get("output_dir"):
        path = Path(str(cfg.output_dir))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path("outputs") / command / f"{stamp}-{cfg.task.name}-{cfg.get('split', 'run')}"
    return make_dir(path)


def load_task_checked(cfg: DictConfig):
    """The task's data, with an unknown task named as such (not as a missing folder)."""
    from fedprompt.data import load_task
    from fedprompt.typed_config import plain_dict

    try:
        return load_task(plain_dict(cfg.task), cfg.get("data_dir"))
    except FedPromptError as err:
        if cfg.task.get("custom"):
            raise ConfigError(
                f"unknown task {cfg.task.name!r}: no conf/task/{cfg.task.name}.yaml (known: "
                f"{', '.join(o for o in group_options('task') if o != 'custom')}) and no usable data folder ({err})"
            ) from None
        raise
