"""Algorithms: advantages, log-ratios, credit weights and clipped objectives (GRPO, PCPO, ablations)."""

from __future__ import annotations

from pcpo_hydra.algorithms.advantages import PerPromptStatTracker, clip_advantages, group_advantages
from pcpo_hydra.algorithms.credit import (
    credit_plan,
    proportional_weights,
    reweight_scales,
    variance_stds,
)
from pcpo_hydra.algorithms.log_ratio import direct_log_ratio, matching_log_ratio
from pcpo_hydra.algorithms.objectives import log_hinge_objective, ratio_objective
from pcpo_hydra.algorithms.policy_gradient import PolicyGradient

__all__ = [
    "PerPromptStatTracker",
    "PolicyGradient",
    "clip_advantages",
    "credit_plan",
    "direct_log_ratio",
    "group_advantages",
    "log_hinge_objective",
    "matching_log_ratio",
    "proportional_weights",
    "ratio_objective",
    "reweight_scales",
    "variance_stds",
]
