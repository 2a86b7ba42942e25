"""`build_algorithm`: the algorithm config node -> a policy-gradient loss plus an advantage estimator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pcpo_hydra.algorithms.advantages import PerPromptStatTracker, clip_advantages, group_advantages
from pcpo_hydra.algorithms.policy_gradient import PolicyGradient


class AdvantageEstimator(Protocol):
    def __call__(self, prompts: list[str], rewards: Tensor) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class GroupRelative:
    """GRPO: normalise each reward within its prompt's group of consecutive samples."""

    group_size: int
    clip: float

    def __call__(self, prompts: list[str], rewards: Tensor) -> Tensor:
        return clip_advantages(group_advantages(rewards, self.group_size), self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PerPrompt:
    """DDPO: normalise by running per-prompt statistics that persist across epochs."""

    def __init__(self, buffer_size: int, min_count: int, clip: float) -> None:
        self.tracker = PerPromptStatTracker(buffer_size, min_count)
        self.clip = clip

    def __call__(self, prompts: list[str], rewards: Tensor) -> Tensor:
        finite = torch.isfinite(rewards)
        advantages = torch.zeros_like(rewards)
        kept = [p for p, ok in zip(prompts, finite.tolist()) if ok]
        advantages[finite] = self.tracker.update(kept, rewards[finite]).to(rewards)
        return clip_advantages(advantages, self.clip)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)


@dataclass
class Algorithm:
    policy: PolicyGradient
    advantages: AdvantageEstimator


def build_algorithm(
    advantage: str, stat_buffer_size: int, stat_min_count: int, group_size: int, **policy: Any
) -> Algorithm:
    """Hydra target of conf/algorithm/*.yaml; `group_size` comes from the rollout config.

    The remaining keys (objective, log_ratio, credit, credit_mode, clip_range, adv_clip_max) are
    PolicyGradient's own arguments; the config schema has already checked them.
    """
    clip = policy["adv_clip_max"]
    estimator: AdvantageEstimator = (
        GroupRelative(group_size, clip)
        if advantage == "group"
        else PerPrompt(stat_buffer_size, stat_min_count, clip)
    )
    return Algorithm(PolicyGradient(**policy), estimator)
