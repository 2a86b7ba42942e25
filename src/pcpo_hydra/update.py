"""The clipped method's update: recompute the network output with gradients at the trained steps; step the optimizer."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import Tensor

from pcpo_hydra.algorithms.steps import trained_steps
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


class NonFiniteLoss(RuntimeError):
    """`train.max_nan_steps` micro-batches in a row had a NaN or infinite loss."""


def _any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank if `flag` is true on any (ranks must take the same branch around a collective)."""
    if accelerator.num_processes == 1:
        return flag
    mine = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(mine, reduction="max").item())


def _zero_loss(params: list[Tensor]) -> Tensor:
    """A loss with exact zero gradients for every trained weight: what a skipped micro-batch backpropagates.

    Multiplying the NaN loss by zero would not do (0 * NaN is NaN, and so are its gradients); the
    backward still runs, so DDP/DeepSpeed see the same collective calls on every rank.
    """
    return sum(p.sum() for p in params) * 0.0


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
    forwards, grad_norms, skipped, in_a_row = 0, [], 0, 0
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
                    bad = _any_rank(not torch.isfinite(loss).item(), accelerator)
                    accelerator.backward(_zero_loss(params) if bad else loss * weight)
                    if accelerator.sync_gradients:  # only here: the wrapped step is not free even as a no-op
                        norm = accelerator.clip_grad_norm_(params, train.max_grad_norm)
                        grad_norms.append(norm)
                        if norm is None or math.isfinite(float(norm)):  # DeepSpeed (None) stepped in backward
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                skipped, in_a_row = skipped + bad, (in_a_row + 1) * bad
                if in_a_row >= train.max_nan_steps:
                    raise NonFiniteLoss(
                        f"{in_a_row} micro-batches in a row had a non-finite loss (train.max_nan_steps="
                        f"{train.max_nan_steps}); stopping with the last checkpoint as it was"
                    )
                if bad:
                    continue
                totals["loss"] += loss.detach()
                for key, value in stats.items():
                    totals[key] += value.detach()
                forwards += 1
    means = {f"train/{key}": float(value) / max(forwards, 1) for key, value in totals.items()}
    norms = [float(g) for g in grad_norms if g is not None]
    means["train/grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
    means["train/num_updates"] = float(len(grad_norms))
    means["train/nan_steps"] = float(skipped)
    return means
