"""Which schema checks a group node: each component registers its own, keyed by the `_target_` it names.

A component's schema lives beside it, in a torch-free module (`pcpo_hydra/rewards/schemas.py`
for the rewards), and says which targets it checks with `@register(group, ...)`. The core's
modules are imported on first use; an outside package needs no entry here: a target this
registry does not know makes it import the `schemas` module of each package enclosing the
target (`mypkg.schemas`, `mypkg.rewards.schemas` for `mypkg.rewards.score.MyReward`), so
registering there is all a plugin does. Only packages are imported on the way, never the
target's own module, so checking a config never pulls in torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

GROUPS = ("model", "sampler", "reward", "algorithm", "hardware", "prompts", "logger", "eval")

# The core's schema modules, one per part of the package (not one per component).
_CORE = (
    "pcpo_hydra.models.schemas",
    "pcpo_hydra.samplers.schemas",
    "pcpo_hydra.rewards.schemas",
    "pcpo_hydra.algorithms.schemas",
    "pcpo_hydra.hardware",
    "pcpo_hydra.prompts",
    "pcpo_hydra.tracker",
    "pcpo_hydra.evaluation.schemas",
)

# group -> {target: schema}; the key None stands for a group whose nodes name no `_target_` (hardware).
_SCHEMAS: dict[str, dict[Optional[str], type]] = {group: {} for group in GROUPS}
_loaded = False

S = TypeVar("S", bound=type)


def register(group: str, *targets: Optional[str]) -> Callable[[S], S]:
    """Class decorator: the schema checks `group` nodes naming any of `targets` (default: its own `_target_`)."""
    if group not in _SCHEMAS:
        raise ValueError(f"register({group!r}): no such config group; groups are {', '.join(GROUPS)}")

    def add(schema: S) -> S:
        for target in targets or (schema._target_,):
            _SCHEMAS[group][target] = schema
        return schema

    return add


def group_schemas() -> dict[str, dict[Optional[str], type]]:
    """Every registered schema, by group and target (the core's loaded first)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _CORE:
            importlib.import_module(module)
    return _SCHEMAS


def _import_enclosing_schemas(target: str) -> None:
    """Import `<package>.schemas` for every package enclosing `target`, stopping at the first plain module."""
    parts = target.split(".")
    for end in range(1, len(parts)):
        package = ".".join(parts[:end])
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return
        if spec is None or spec.submodule_search_locations is None:
            return
        if importlib.util.find_spec(f"{package}.schemas") is not None:
            importlib.import_module(f"{package}.schemas")


def schema_for(group: str, node: Any, key: str | None = None) -> type:
    """The schema a node of `group` (at `key`, the group itself by default) must follow, by its `_target_`."""
    schemas = group_schemas()[group]
    target = node.get("_target_") if hasattr(node, "get") else None
    if target not in schemas and isinstance(target, str):
        _import_enclosing_schemas(target)
    if target in schemas:
        return schemas[target]
    known = ", ".join(repr(t) for t in schemas if t is not None) or "(none: this group takes no _target_)"
    raise KeyError(f"{key or group}._target_={target!r}: must be one of {known}")


@dataclass(frozen=True)
class Nested:
    """A schema field holding whole nodes of another group, each checked by that group's own schema.

    A schema lists them as `NESTED = {field: Nested(group, ...)}` (a multi reward's components).
    """

    group: str
    many: bool = True           # a map name -> node; else one node, or null for none
    may_be_empty: bool = False  # an empty map is allowed (else it is an error naming the field)


def nested_nodes(schema: type, node: Any, key: str) -> Iterator[tuple[str, Nested, str, Optional[str], Any]]:
    """(field, spec, child key, name in its map or None, child node) for every nested node of `node`.

    `key` is where `node` sits ("" for a command's root config).
    """
    for field_name, spec in getattr(schema, "NESTED", {}).items():
        value = node.get(field_name) if hasattr(node, "get") else None
        field_key = f"{key}.{field_name}" if key else field_name
        if not spec.many:
            if value is not None:
                yield field_name, spec, field_key, None, value
            continue
        for name, child in (value or {}).items():
            yield field_name, spec, f"{field_key}.{name}", name, child
