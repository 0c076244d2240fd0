"""Strict, typed config sections: a config node merged onto a dataclass schema with OmegaConf.

OmegaConf's structured configs already reject unknown keys and values of the wrong type; this module only
turns their exceptions into one-line :class:`~fedprompt.errors.ConfigError` messages that name the key.
Range checks stay with each dataclass (a ``validate()`` method), since only it knows what makes sense.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fedprompt.errors import ConfigError

T = TypeVar("T")


def from_node(cls: type[T], node: Any, where: str) -> T:
    """An instance of dataclass ``cls`` from ``node`` (a dict, a DictConfig or None for the defaults).

    Calls ``validate()`` on the result when the class defines it.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if node is None:
        node = {}
    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"{where} must be a mapping, got {node!r}")
    try:
        if isinstance(node, DictConfig):  # resolve ${...} against the whole config: merged below, the section is
            node = OmegaConf.to_container(node, resolve=True)  # detached and ${model.name} would find itself
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        value = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        known = ", ".join(sorted(OmegaConf.structured(cls).keys()))
        raise ConfigError(f"{where}: unknown key {_key(err, where)} ({_first_line(err)}); known keys at that level "
                          f"include: {known}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}.{getattr(err, 'full_key', '?')}: {_first_line(err)}") from None
    if hasattr(value, "validate"):
        value.validate()
    return value


def _key(err: Exception, where: str) -> str:
    key = getattr(err, "full_key", None)
    return f"{where}.{key}" if key else "?"


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
