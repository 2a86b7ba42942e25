"""The rwr node's schema, registered the way any outside component registers (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from pcpo_hydra.config.checks import checked, positive
from pcpo_hydra.config.registry import register


@register("algorithm")
@dataclass
class RewardWeightedSchema:
    _target_: str = "rwr_algorithm.algorithm.RewardWeightedRegression"
    temperature: float = checked(positive())
