"""The one validator of every config section: a node checked against the dataclass that declares it.

Each section of the config (``method`` of every method, ``privacy``, ``federation``, ``service``,
``distill``, ``transfer``, ``deploy``, ``task``, ...) is declared once, as a dataclass: its keys, their
types and defaults, and (``validate()``) the ranges and rules that involve several keys. :func:`from_node`
validates a node against that declaration with pydantic, and every section follows the same rules:

- **unknown keys are errors**, with the keys the node takes and a did-you-mean;
- **one coercion rule** (JSON's types, strictly): an integer key takes a whole number only (not ``"240"``,
  ``3.0`` or ``true``); a real-number key takes any number (``3`` is ``3.0``; ``.inf`` where infinity
  makes sense); a boolean key takes ``true``/``false`` only; a text key takes text only (quote a number meant
  as text on the command line: ``task.name="'2024'"``); never text where a number belongs;
- **errors are one line that names the full key**: ``method.search.budget must be >= 1, got 0``.

A dataclass's ``validate()`` (and ``__post_init__``) raise :class:`~fedprompt.errors.ConfigError`; their
message may name the key relative to the class (``budget must be >= 1``): it is completed to the full path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar, cast

from fedprompt.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from pydantic import ConfigDict
    from pydantic_core import ErrorDetails

T = TypeVar("T")

# pydantic's settings of every declared section (the one coercion rule above). Validation goes through JSON
# (the config came from YAML and the command line, both JSON-typed), where pydantic's strict mode accepts a
# mapping for a dataclass and a whole number for a real one.
CONFIG: ConfigDict = {"strict": True, "extra": "forbid"}


def from_node(cls: type[T], node: Any, where: str) -> T:
    """An instance of the declared section ``cls`` from ``node`` (a dict, a DictConfig, or None for the
    defaults), validated: types and unknown keys (pydantic), then ``validate()`` of every dataclass in it."""
    data = plain(node)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping (key: value), got {data!r}")
    try:
        value = _validate(cls, data, where)
        check_tree(value, where)
    except ConfigError as err:
        err.complete = True  # its message names the full key: a section checked inside another keeps it
        raise
    return value


def plain(node: Any) -> Any:
    """``node`` as plain Python (a DictConfig resolved against its whole config: ``${model.name}``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def plain_dict(node: DictConfig) -> dict[str, Any]:
    """A mapping node as a plain dict, resolved (``to_container`` is typed for any node; a DictConfig gives a dict)."""
    return cast("dict[str, Any]", plain(node))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}`` (dotted keys, as on the command line); an empty mapping adds nothing."""
    if not isinstance(data, Mapping):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def check_tree(value: Any, where: str) -> None:
    """``validate()`` of ``value`` and of every dataclass inside it (children first), full key paths in errors."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return
    for f in dataclasses.fields(value):
        check_tree(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
    if hasattr(value, "validate"):
        try:
            value.validate()
        except ConfigError as err:
            raise ConfigError(full_path(str(err), where, value)) from None


def full_path(message: str, where: str, value: Any = None) -> str:
    """``message`` with its key completed to the full path: ``budget must ...`` or ``search.budget must ...``
    raised under ``method.search`` both become ``method.search.budget must ...``."""
    if not where or message.startswith(where):
        return message
    parts = where.split(".")
    for i in range(1, len(parts)):  # a tail of the path: "search.budget" under "method.search"
        tail = ".".join(parts[i:])
        if re.match(re.escape(tail) + r"\b", message):
            return ".".join(parts[:i]) + "." + message
    names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else []
    head = re.match(r"(\w+)( must\b)?", message)
    if head and (head.group(1) in names or (value is None and head.group(2))):
        return f"{where}.{message}"
    return f"{where}: {message}"


@cache
def _adapter(cls: type) -> Any:
    from pydantic import ConfigDict, TypeAdapter

    _configure(cls, ConfigDict(**CONFIG))
    return TypeAdapter(cls)


def _configure(cls: Any, config: ConfigDict) -> None:
    """Give every dataclass reachable from ``cls`` the one set of rules (pydantic reads ``__pydantic_config__``)."""
    import typing

    from pydantic import with_config

    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or "__pydantic_config__" in cls.__dict__:
        return
    with_config(config)(cls)  # sets cls.__pydantic_config__
    for hint in typing.get_type_hints(cls, include_extras=True).values():
        for arg in _type_args(hint):
            _configure(arg, config)


def _type_args(hint: Any) -> list[Any]:
    import typing

    out = [hint]
    for arg in typing.get_args(hint):
        out += _type_args(arg)
    return out


def _validate(cls: type[T], data: dict, where: str) -> T:
    from pydantic import ValidationError

    try:
        text = json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: not a config of plain values ({err})") from None
    section: type = cls  # a plain type: mypy does not see that a type[T] is hashable, as functools.cache needs
    try:
        return _adapter(section).validate_json(text)
    except ValidationError as err:
        raise ConfigError(describe(err.errors(), where, cls, data)) from None


def describe(errors: Sequence[ErrorDetails], where: str, cls: type, data: Any) -> str:
    """The first of pydantic's errors as one line, naming the full key."""
    error = errors[0]
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    key = ".".join(filter(None, [where, *loc]))
    kind, given = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):  # __post_init__, or a section inside
        inner = ctx["error"]
        return str(inner) if getattr(inner, "complete", False) else full_path(str(inner), key)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _keys_at(cls, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"; did you mean {'.'.join(filter(None, [where, *loc[:-1], close[0]]))!r}?" if close else ""
        parent = ".".join(filter(None, [where, *loc[:-1]]))
        node = f"the {parent} node" if parent else "the root config"
        return (f"unknown config key {key!r}: {node} takes {known}{hint} (fix the override or the yaml file in "
                "conf/)")
    if kind == "missing" or kind == "missing_argument":
        return f"{key} is required; set it as {key}=<value>"
    if given is None and kind.endswith("_type"):
        return f"{key} must not be null"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{key} must be {bounds[kind]} {limit}, got {given!r}"
    if kind == "literal_error":
        return f"{key}={given!r} is not one of [{ctx.get('expected', '')}]"
    if kind.startswith("int_"):
        return f"{key} must be a whole number (e.g. 3; not a string, 3.0 or true), got {given!r}"
    if kind.startswith("float_"):
        return f"{key} must be a number, got {given!r}"
    if kind.startswith("bool_"):
        return f"{key} must be true or false, got {given!r}"
    if kind.startswith("string_"):
        return f"{key} must be text, got {given!r}"
    if kind in ("dataclass_type", "dict_type", "model_type", "dataclass_exact_type"):
        return f"{key} must be a mapping (key: value), got {given!r}"
    if kind in ("list_type", "tuple_type"):
        return f"{key} must be a list, got {given!r}"
    if kind == "none_required":
        return f"{key} must be null, got {given!r}"
    return f"{key}: {error['msg']}, got {given!r}"


def _keys_at(cls: Any, path: list[str]) -> list[str]:
    """The keys the dataclass node at ``path`` under ``cls`` takes (for the unknown-key message)."""
    import typing

    for name in path:
        if not dataclasses.is_dataclass(cls):
            return []
        hints = typing.get_type_hints(cls)
        cls = next((a for a in _type_args(hints.get(name)) if isinstance(a, type) and dataclasses.is_dataclass(a)),
                   None)
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

