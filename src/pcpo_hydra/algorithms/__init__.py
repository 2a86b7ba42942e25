"""Algorithms: the `Algorithm` protocol the loop trains through, and the clipped policy gradient
(GRPO, PCPO, ablations) with its advantages, log-ratios, credit weights and objectives.

Names resolve on first access, so validation can read `algorithms.schemas` without torch.
"""

from __future__ import annotations

from pcpo_hydra.lazy import lazy_exports

_EXPORTS = {
    "Algorithm": "base",
    "ClippedPolicyGradient": "clipped",
    "AdvantageEstimator": "advantages",
    "GroupRelative": "advantages",
    "PerPrompt": "advantages",
    "PerPromptStatTracker": "advantages",
    "clip_advantages": "advantages",
    "group_advantages": "advantages",
    "credit_plan": "credit",
    "proportional_weights": "credit",
    "reweight_scales": "credit",
    "variance_stds": "credit",
    "direct_log_ratio": "log_ratio",
    "matching_log_ratio": "log_ratio",
    "log_hinge_objective": "objectives",
    "ratio_objective": "objectives",
    "PolicyGradient": "policy_gradient",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
