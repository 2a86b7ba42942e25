"""What a component needs from the machine beside its config; a schema lists them in `NEEDS`.

`pcpo-train` checks every node's needs before anything heavy (pcpo_hydra.preflight), so a missing
extra, a missing executable or a dead server is one line naming the fix, not an error from deep
inside the component's constructor after the model was built. An outside component declares its
own needs the same way on its schema: a need is any object with `problem(node, key)`, so one that
only a kind of component has lives with it (a reward server's in rewards.health).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PythonModule:
    """An importable module, found without importing it."""

    name: str
    install: str  # the command that provides it

    def problem(self, node: Any, key: str) -> str | None:
        if importlib.util.find_spec(self.name) is not None:
            return None
        return f"{key} ({node._target_}) needs the Python module {self.name}; fix: {self.install}"


@dataclass(frozen=True)
class Executable:
    """A program the node's `field` names (a path or a command on PATH; null: `default`)."""

    field: str
    default: str
    install: str

    def problem(self, node: Any, key: str) -> str | None:
        command = getattr(node, self.field) or self.default
        if shutil.which(command) is not None:
            return None
        return (f"{key} ({node._target_}) needs the executable {command!r}, which is not on PATH "
                f"({key}.{self.field}={getattr(node, self.field)!r}); fix: {self.install}, "
                f"or set {key}.{self.field}=<path to {self.default}>")
