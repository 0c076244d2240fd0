"""``fedprompt <command> --help``: the keys a command reads, from their declarations (fedprompt.schema).

Every key of every section the command reads is listed with its type, its value in the composed config
(the declared default, or what conf/ or the command line set) and one line of help: the comment after the
field in its dataclass, else the class docstring's ``- ``key``: help`` line, else the comment after the key
in the conf/ file that sets it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any, Sequence

# The sections each command reads ("" = the root keys); `fedprompt task` reads what eval reads.
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "eval": ("", "task", "model", "service"),
    "serve": ("", "model", "service"),
    "run": ("", "task", "model", "service", "method", "privacy", "federation", "partition"),
    "deploy": ("", "task", "model", "service", "method", "privacy", "federation", "partition", "deploy"),
    "distill": ("", "task", "model", "distill"),
    "transfer": ("", "task", "model", "transfer"),
    "task": ("", "task", "model", "service"),
    "partition": ("", "task", "federation", "partition"),
}
# Root keys that are a command's own (the rest are shared by every command).
ROOT_KEYS = {"serve": ("host", "port", "batch_size", "seed"),
             "distill": ("data_dir", "split", "batch_size", "seed", "output_dir"),
             "transfer": ("data_dir", "split", "batch_size", "seed", "output_dir"),
             "partition": ("data_dir", "seed", "output_dir")}


def section_class(key: str, cfg: Any) -> type:
    """The dataclass that declares root key ``key`` of ``cfg`` (the method's and mechanism's by their name)."""
    from fedprompt.schema import RootSchema, privacy_class

    if key == "":
        return RootSchema
    if key == "method":
        from fedprompt.registry import federated_method

        return federated_method(cfg.method.get("name")).load("config")
    if key == "privacy":
        return privacy_class(cfg.privacy.get("name"))
    if key in ("distill", "transfer"):
        from importlib import import_module

        from fedprompt.schema import ON_DEMAND_CLASSES

        module, _, attribute = ON_DEMAND_CLASSES[key].partition(":")
        return getattr(import_module(module), attribute)
    hint = typing.get_type_hints(RootSchema)[key]
    return hint


def command_keys(command: str, overrides: Sequence[str] = ()) -> str:
    """The ``--help`` text of ``command``: one line per key of every section it reads."""
    from omegaconf import OmegaConf

    from fedprompt.config import compose, conf_dir

    cfg = compose(list(overrides))
    lines = []
    for key in COMMAND_SECTIONS[command]:
        cls = section_class(key, cfg)
        node = OmegaConf.to_container(cfg, resolve=True) if key == "" else OmegaConf.to_container(cfg[key], resolve=True)
        title = "root keys" if key == "" else f"{key}.* keys"
        lines.append(f"\n# {title} ({cls.__module__}.{cls.__qualname__})")
        rows = list(_rows(cls, node, key, _yaml_comments(conf_dir(), cfg, key)))
        if key == "":
            rows = [r for r in rows if "." not in r[0] and (command not in ROOT_KEYS or r[0] in ROOT_KEYS[command])]
        width = max((len(f"{k}: {t} = {v}") for k, t, v, _ in rows), default=0)
        for name, kind, value, text in rows:
            head = f"{name}: {kind} = {value}"
            lines.append(f"  {head:<{min(width, 60)}}  {text}".rstrip())
    return "\n".join(lines)


def _rows(cls: type, node: Any, where: str, comments: dict[str, str]):
    hints = typing.get_type_hints(cls, include_extras=True)
    helps = field_help(cls)
    node = node if isinstance(node, dict) else {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        hint = hints[f.name]
        inner = _dataclass_in(hint)
        if inner is not None:
            if where == "" and f.name in COMMAND_SECTIONS["deploy"] + ("distill", "transfer"):
                continue  # a section: listed under its own title
            yield from _rows(inner, node.get(f.name), key, comments)
            continue
        if where == "" and typing.get_origin(hint) is typing.Annotated:
            continue  # an on-demand section (method, privacy, distill, transfer)
        value = node.get(f.name, _default(f))
        text = helps.get(f.name) or comments.get(key, "")
        yield key, type_name(hint), _show(value), text


def _dataclass_in(hint: Any) -> type | None:
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def _show(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        value = json.dumps(value) if (not value or any(c in value for c in " \n#:{}[],'\"")) else value
        return value if len(value) <= 60 else value[:57] + "..."
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(hint: Any) -> str:
    """``int``, ``float | null``, ``list[str]``, ``dict[str, float]``: the type as a config key takes it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    if hint is typing.Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


@cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's one line of help, from the class source: the comment after the field, else the
    docstring's ``- ``key``: help`` line."""
    out: dict[str, str] = {}
    doc = inspect.getdoc(cls) or ""
    for item in re.finditer(r"^- ``(\w+)``(?:, ``\w+``)*: (.+?)(?=\n- |\n\n|\Z)", doc, re.M | re.S):
        out[item.group(1)] = " ".join(item.group(2).split()).rstrip(";.")
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    names = {f.name for f in dataclasses.fields(cls)}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*?#\s*(.+)$", line)
        if match and match.group(1) in names and '"' not in line.split("#", 1)[1][:1]:
            out[match.group(1)] = match.group(2).strip()
    return out


def _yaml_comments(folder: Path, cfg: Any, key: str) -> dict[str, str]:
    """``full.key -> comment`` from the conf/ file of section ``key`` that the config chose (a fallback)."""
    if key == "":
        files = [folder / "config.yaml", folder / "service" / "default.yaml"]
    else:
        choice = {"method": cfg.method.get("name"), "privacy": cfg.privacy.get("name"), "partition": cfg.partition.get("scheme")}
        name = choice.get(key) or ("default" if (folder / key / "default.yaml").is_file() else cfg[key].get("name"))
        files = [folder / key / f"{name}.yaml", folder / key / "default.yaml"]
        if key == "service":
            files = [folder / "service" / "default.yaml"]
    out: dict[str, str] = {}
    for path in files:
        if path.is_file():
            base = "" if key in ("", "service") else key
            out.update(yaml_comments(path.read_text(), base))
    return out


def yaml_comments(text: str, base: str = "") -> dict[str, str]:
    """``key.path -> comment`` of every ``key: value  # comment`` line of a YAML file (nested by indentation)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = re.match(r"^(\s*)([\w-]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([p for _, p in stack] + [name])
        value = rest.lstrip()
        start = len(rest) - len(value)
        if value[:1] in ("'", '"'):  # a quoted scalar: its comment starts after the closing quote
            close = value.find(value[0], 1)
            start += close + 1 if close > 0 else len(value)
        comment = re.search(r"\s#\s*(.+)$", rest[start:])
        if comment:
            out[f"{base}.{path}" if base else path] = comment.group(1).strip()
        if not rest.split("#")[0].strip():
            stack.append((indent, name))
    return out
