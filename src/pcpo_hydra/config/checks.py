"""Declarative field constraints: a schema field says what values it allows, one walker checks them.

Each constraint is a predicate plus the words an error message uses for "what is allowed".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterator

from omegaconf import MISSING


@dataclass(frozen=True)
class Constraint:
    """A predicate on a field's value and a human description of the allowed values."""

    test: Callable[[Any], bool]
    allowed: str


def positive() -> Constraint:
    return Constraint(lambda v: v > 0, "a number > 0")


def at_least(low: float) -> Constraint:
    return Constraint(lambda v: v >= low, f"a number >= {low}")


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Constraint:
    """The interval between `low` and `high`, each end open or closed."""

    def test(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    return Constraint(test, f"a number in {brackets[0]}{low}, {high}{brackets[1]}")


def one_of(*choices: Any) -> Constraint:
    return Constraint(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def checked(constraint: Constraint) -> Any:
    """A required dataclass field whose value must satisfy `constraint` (None is always left alone).

    Required (MISSING): its default is written once, in the YAML under conf/.
    """
    return field(default=MISSING, metadata={"constraint": constraint})


def violations(node: Any, prefix: str) -> Iterator[str]:
    """Yield 'key=value: must be ...' for every constrained field and broken relation of a dataclass tree."""
    if not is_dataclass(node):
        return
    for f in fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        constraint: Constraint | None = f.metadata.get("constraint")
        if constraint is not None and value is not None and not constraint.test(value):
            yield f"{key}={value!r}: must be {constraint.allowed}"
        yield from violations(value, key)
    relations = getattr(node, "relations", None)  # a schema's checks between its own fields
    if relations is not None:
        yield from relations(prefix)
