"""`ClippedPolicyGradient`: the per-step clipped policy gradient, of which GRPO and PCPO are presets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pcpo_hydra.update import update_policy

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from omegaconf import DictConfig
    from torch import Tensor

    from pcpo_hydra.algorithms.advantages import AdvantageEstimator
    from pcpo_hydra.algorithms.policy_gradient import PolicyGradient
    from pcpo_hydra.models.base import PolicyModel
    from pcpo_hydra.rollout import Trajectories
    from pcpo_hydra.samplers.base import BaseSampler


class ClippedPolicyGradient:
    """An `Algorithm` (algorithms/base.py): an advantage estimator plus PolicyGradient's per-step loss.

    `policy` is the loss with every GRPO/PCPO switch (objective, log-ratio route, credit, KL
    penalty); `estimator` turns rewards into advantages (group-relative or per-prompt). The
    update is `update.update_policy`: shuffled micro-batches of (sample, trained step) pairs.
    """

    def __init__(self, policy: PolicyGradient, estimator: AdvantageEstimator) -> None:
        self.policy = policy
        self.estimator = estimator

    def prepare(self, model: PolicyModel, sampler: BaseSampler) -> BaseSampler:
        """Keep the reference network when the KL penalty is on; fix the credit scales (and stds)."""
        if self.policy.kl_beta:
            model.keep_reference()
        return self.policy.prepare(sampler)

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        return self.estimator(prompts, rewards)

    def update(
        self,
        traj: Trajectories,
        model: PolicyModel,
        sampler: BaseSampler,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        train: DictConfig,
        generator: torch.Generator,
    ) -> dict[str, float]:
        return update_policy(traj, model, sampler, self.policy, optimizer, accelerator, train, generator)

    def state_dict(self) -> dict[str, Any]:
        """The estimator's state alone: what checkpoints before pluggable algorithms saved as "advantages"."""
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state)
