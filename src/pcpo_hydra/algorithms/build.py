"""`build_algorithm`: an algorithm config node (conf/algorithm/grpo.yaml, pcpo.yaml) -> ClippedPolicyGradient.

The `_target_` of those presets, and of every saved config that `resume=` reloads, so it stays here.
"""

from __future__ import annotations

from typing import Any

from pcpo_hydra.algorithms.advantages import AdvantageEstimator, GroupRelative, PerPrompt
from pcpo_hydra.algorithms.clipped import ClippedPolicyGradient
from pcpo_hydra.algorithms.policy_gradient import PolicyGradient


def build_algorithm(
    advantage: str, stat_buffer_size: int, stat_min_count: int, group_size: int, **policy: Any
) -> ClippedPolicyGradient:
    """Hydra target of conf/algorithm/*.yaml; `group_size` comes from the rollout config.

    The remaining keys (objective, log_ratio, credit, credit_mode, clip_range, adv_clip_max,
    kl_beta) are PolicyGradient's own arguments; the config schema has already checked them.
    """
    clip = policy["adv_clip_max"]
    estimator: AdvantageEstimator = (
        GroupRelative(group_size, clip)
        if advantage == "group"
        else PerPrompt(stat_buffer_size, stat_min_count, clip)
    )
    return ClippedPolicyGradient(PolicyGradient(**policy), estimator)
