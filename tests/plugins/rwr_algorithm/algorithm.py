"""`RewardWeightedRegression`: an Algorithm whose update is not a clipped policy gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pcpo_hydra.algorithms.steps import trained_steps


class RewardWeightedRegression:
    """Raise the log-likelihood of every trained step of a sample, weighted by exp(advantage / temperature).

    Advantages are rewards minus the epoch's mean (no std: a plain baseline), so they differ from
    GRPO's in a way the logged advantage statistics show. `updates` counts the epochs trained: the
    state a resumed run restores.
    """

    def __init__(self, temperature: float, group_size: int) -> None:
        self.temperature = temperature
        self.updates = 0

    def prepare(self, model, sampler):
        return sampler

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        finite = torch.isfinite(rewards)
        return torch.where(finite, rewards - rewards[finite].mean(), 0.0)

    def update(self, traj, model, sampler, optimizer, accelerator, train, generator) -> dict[str, float]:
        """Micro-batches of train.batch_size samples x train.steps_per_forward steps, one backward each."""
        n, steps = traj.log_probs.shape
        trained = trained_steps(steps, train.timestep_fraction)
        weights = torch.exp(traj.advantages / self.temperature)
        losses, pairs, optimizer_steps = [], 0, 0
        for _ in range(train.inner_epochs):
            for rows in torch.randperm(n, generator=generator).split(train.batch_size):
                order = torch.argsort(torch.rand(len(rows), steps, generator=generator), dim=1)[:, :trained]
                for chunk in order.split(train.steps_per_forward, dim=1):
                    r, k = rows[:, None].expand_as(chunk).reshape(-1), chunk.reshape(-1)
                    x, cond = traj.latents[r, k], {key: value[r] for key, value in traj.cond.items()}
                    i = k + traj.first_step  # the sampler's step of stored step k (an SDE window starts later)
                    with accelerator.accumulate(model.network):
                        f = model.predict(x, sampler.timestep(i), cond).float()
                        loss = -(weights[r] * sampler.log_prob(i, x, f, traj.latents[r, k + 1])).mean()
                        accelerator.backward(loss)
                        optimizer_steps += accelerator.sync_gradients
                        optimizer.step()
                        optimizer.zero_grad()
                    losses.append(loss.item())
                    pairs += len(r)
        self.updates += 1
        return {"train/rwr_loss": sum(losses) / len(losses), "train/rwr_pairs": float(pairs),
                "train/rwr_optimizer_steps": float(optimizer_steps), "train/rwr_weight_max": weights.max().item()}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
