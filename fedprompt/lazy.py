"""Lazy package exports (PEP 562): a package names each exported name's submodule, and the submodule is imported
on the first use of the name, so that importing one submodule (e.g. a torch-free config, to compose a config)
does not import its siblings (torch, transformers, opacus)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (its ``__name__``), ``exports`` mapping name -> submodule."""
    module = sys.modules[package]

    # Any, not object: a type checker cannot follow the lazy import, and object would make every export unusable
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        setattr(module, name, value)  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__
