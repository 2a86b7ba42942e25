"""The shapes world's reward and prompt nodes (conf/reward/world_*.yaml, conf/prompts/world.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from pcpo_hydra.config.checks import Constraint, checked, positive
from pcpo_hydra.config.registry import register
from pcpo_hydra.world import grammar as world


@register("reward", *(f"pcpo_hydra.rewards.world.{name}Agreement" for name in ("Colour", "Position", "Size", "Shape")))
@dataclass
class WorldRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(positive())


def _words_of(vocabulary: tuple[str, ...]) -> Constraint:
    return Constraint(lambda v: 0 < len(v) and set(v) <= set(vocabulary), "a non-empty list of " + ", ".join(vocabulary))


@register("prompts")
@dataclass
class WorldPromptsSchema:
    _target_: str = "pcpo_hydra.world.grammar.world_prompts"
    colours: list[str] = checked(_words_of(tuple(world.COLOURS)))
    shapes: list[str] = checked(_words_of(world.SHAPES))
    sizes: list[str] = checked(_words_of(tuple(world.SIZES)))
    positions: list[str] = checked(_words_of(tuple(world.POSITIONS)))
