"""The shapes world's reward and prompt nodes (its conf/reward/world_*.yaml, conf/prompts/world.yaml).

Nothing in pcpo_hydra lists this module: the registry imports it when it meets a target under
`pcpo_shapes_world`, as it would any outside package's `schemas` module.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from pcpo_hydra.config.checks import Constraint, checked, positive
from pcpo_hydra.config.registry import register
from pcpo_shapes_world import grammar as world


@register("reward", *(f"pcpo_shapes_world.rewards.{name}Agreement" for name in ("Colour", "Position", "Size", "Shape")))
@dataclass
class WorldRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(positive())


def _words_of(vocabulary: tuple[str, ...]) -> Constraint:
    return Constraint(lambda v: 0 < len(v) and set(v) <= set(vocabulary), "a non-empty list of " + ", ".join(vocabulary))


@register("prompts")
@dataclass
class WorldPromptsSchema:
    _target_: str = "pcpo_shapes_world.grammar.world_prompts"
    colours: list[str] = checked(_words_of(tuple(world.COLOURS)))
    shapes: list[str] = checked(_words_of(world.SHAPES))
    sizes: list[str] = checked(_words_of(tuple(world.SIZES)))
    positions: list[str] = checked(_words_of(tuple(world.POSITIONS)))
