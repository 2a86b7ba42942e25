"""What an algorithm node takes, checked before any model is built (torch-free)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import at_least, checked, interval, one_of, positive
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


@register("algorithm")
@dataclass
class SDPOSchema:
    """conf/algorithm/sdpo.yaml: SDPO's keys (algorithms/sdpo.py), each with the reference's default there."""

    _target_: str = "pcpo_hydra.algorithms.sdpo.SDPO"
    gamma: float = checked(interval(0.0, 1.0))
    lam: float = checked(interval(0.0, 1.0, low_open=True))
    log_scale: float = checked(positive())
    clip_range: float = checked(positive())
    adv_clip_max: float = checked(positive())
    stat_buffer_size: int = checked(positive())
    stat_min_count: int = checked(positive())
    shuffle_batch: bool = MISSING
    shuffle_timestep: bool = MISSING

    # the update trains one slot of steps across all micro-batches at a time (update.Schedule.steps_major),
    # so the accelerator accumulates over a slot's micro-batches only (build.accumulation_steps)
    STEPS_MAJOR: ClassVar[bool] = True

    @staticmethod
    def run_problems(cfg: Any) -> Iterator[str]:
        """What SDPO needs of the rest of the run: whole pairs everywhere, and every step stored."""
        for key, value in (("rollout.group_size", cfg.rollout.group_size),
                           ("rollout.batch_size", cfg.rollout.batch_size),
                           ("train.batch_size", cfg.train.batch_size)):
            if value % 2:
                yield f"{key}={value}: algorithm=sdpo trains pairs of samples of one prompt, so it must be even"
        if cfg.rollout.drop_flat_groups:
            yield ("rollout.drop_flat_groups=true: algorithm=sdpo learns from reward differences at every step, "
                   "not from groups' final rewards; set rollout.drop_flat_groups=false")
        window = cfg.sampler.sde_window
        if window is not None and window.size is not None:
            yield (f"sampler.sde_window.size={window.size}: algorithm=sdpo scores clean-sample predictions along "
                   "the whole trajectory; set sampler.sde_window.size=null")
