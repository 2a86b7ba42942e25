"""What an algorithm node takes, checked before any model is built (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pcpo_hydra.config.checks import at_least, checked, one_of, positive
from pcpo_hydra.config.registry import register


@register("algorithm")
@dataclass
class AlgorithmSchema:
    _target_: str = "pcpo_hydra.algorithms.build.build_algorithm"
    objective: str = checked(one_of("ratio", "log_hinge"))
    log_ratio: str = checked(one_of("direct", "matching"))
    credit: str = checked(one_of("native", "proportional"))
    credit_mode: Optional[str] = checked(one_of("variance", "reweight"))
    clip_range: float = checked(positive())
    adv_clip_max: float = checked(positive())
    kl_beta: float = checked(at_least(0.0))
    advantage: str = checked(one_of("group", "per_prompt"))
    stat_buffer_size: int = checked(positive())
    stat_min_count: int = checked(positive())
