"""Update: recompute the network output with gradients at the trained steps and step the optimizer."""

from __future__ import annotations

from collections import defaultdict

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import Tensor

from pcpo_hydra.rollout import Trajectories


def _step_order(n: int, steps: int, trained: int, generator: torch.Generator) -> Tensor:
    """Per-sample random order of the sampler steps, truncated to the `trained` first (DDPO)."""
    return torch.argsort(torch.rand(n, steps, generator=generator), dim=1)[:, :trained]


def update_policy(
    traj: Trajectories,
    model,
    sampler,
    policy,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    train: DictConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """`train.inner_epochs` passes over the samples; returns the mean of each training statistic."""
    n, steps = traj.log_probs.shape
    trained = max(1, int(steps * train.timestep_fraction))
    params = model.trainable_parameters()
    totals: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=traj.latents.device))
    micro_steps, grad_norms = 0, []
    for _ in range(train.inner_epochs):
        order = torch.randperm(n, generator=generator)
        step_order = _step_order(n, steps, trained, generator)
        for rows in order.split(train.batch_size):
            cond = {k: v[rows] for k, v in traj.cond.items()}
            for j in range(trained):
                i = step_order[rows, j]
                r, k = rows.to(traj.latents.device), i.to(traj.latents.device)
                x = traj.latents[r, k]
                with accelerator.accumulate(model.network):
                    f_new = model.predict(x, sampler.timestep(i), cond).float()
                    loss, stats = policy.step_loss(
                        i, sampler, x, traj.latents[r, k + 1], traj.noise[r, k],
                        traj.outputs[r, k], f_new, traj.log_probs[r, k], traj.advantages[r],
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norms.append(accelerator.clip_grad_norm_(params, train.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                totals["loss"] += loss.detach()
                for key, value in stats.items():
                    totals[key] += value.detach()
                micro_steps += 1
    means = {f"train/{key}": float(value) / micro_steps for key, value in totals.items()}
    means["train/grad_norm"] = float(torch.stack([torch.as_tensor(g) for g in grad_norms]).mean())
    means["train/num_updates"] = float(len(grad_norms))
    return means
