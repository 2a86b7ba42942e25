"""Update: recompute the network output with gradients at the trained steps and step the optimizer."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import Tensor

from pcpo_hydra.config import trained_steps
from pcpo_hydra.rollout import Trajectories


def _step_order(n: int, steps: int, trained: int, generator: torch.Generator) -> Tensor:
    """Per-sample random order of the sampler steps, truncated to the `trained` first (DDPO)."""
    return torch.argsort(torch.rand(n, steps, generator=generator), dim=1)[:, :trained]


def _forwards(rows: Tensor, order: Tensor, per_forward: int) -> Iterator[tuple[Tensor, Tensor, float]]:
    """(sample indices, step indices, weight) of each forward of one micro-batch.

    A forward takes `per_forward` trained steps of every sample. No optimizer step falls between
    a micro-batch's forwards, so grouping its (sample, step) pairs differently leaves the
    accumulated gradient unchanged, and bigger groups run faster. The weight makes a shorter last
    group count by its pairs: every forward's batch-mean loss is scaled to its share of the
    micro-batch (1.0 when `per_forward` divides the trained steps).
    """
    trained = order.shape[1]
    forwards = math.ceil(trained / per_forward)
    for j in range(0, trained, per_forward):
        steps = order[:, j : j + per_forward]
        weight = steps.shape[1] * forwards / trained
        yield rows[:, None].expand_as(steps).reshape(-1), steps.reshape(-1), weight


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
    trained = trained_steps(steps, train.timestep_fraction)
    params = model.trainable_parameters()
    device = traj.latents.device
    totals: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    forwards, grad_norms = 0, []
    for _ in range(train.inner_epochs):
        order = torch.randperm(n, generator=generator).to(device)
        step_order = _step_order(n, steps, trained, generator).to(device)
        for rows in order.split(train.batch_size):
            for r, k, weight in _forwards(rows, step_order[rows], train.steps_per_forward):
                x = traj.latents[r, k]
                cond = {key: value[r] for key, value in traj.cond.items()}
                t = sampler.timestep(k)
                f_ref = model.predict_reference(x, t, cond).float() if policy.kl_beta else None
                with accelerator.accumulate(model.network):
                    f_new = model.predict(x, t, cond).float()
                    loss, stats = policy.step_loss(
                        k, sampler, x, traj.latents[r, k + 1], traj.noise[r, k],
                        traj.outputs[r, k], f_new, traj.log_probs[r, k], traj.advantages[r], f_ref,
                    )
                    accelerator.backward(loss * weight)
                    if accelerator.sync_gradients:  # only here: the wrapped step costs ~1 ms even as a no-op
                        grad_norms.append(accelerator.clip_grad_norm_(params, train.max_grad_norm))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                totals["loss"] += loss.detach()
                for key, value in stats.items():
                    totals[key] += value.detach()
                forwards += 1
    means = {f"train/{key}": float(value) / forwards for key, value in totals.items()}
    means["train/grad_norm"] = float(torch.stack([torch.as_tensor(g) for g in grad_norms]).mean())
    means["train/num_updates"] = float(len(grad_norms))
    return means
