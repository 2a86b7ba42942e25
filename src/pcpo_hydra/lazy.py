"""Package namespaces that import a submodule only when one of its names is first asked for.

Used by the packages whose schemas validation reads (models, samplers, algorithms): importing
the package for its torch-free schemas module must not pull in torch through its `__init__`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` resolving each name of `exports` (name -> submodule) on first access."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
