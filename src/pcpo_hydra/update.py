"""The clipped method's update: recompute the network output with gradients at the trained steps; step the optimizer."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import Tensor

from pcpo_hydra.algorithms.steps import trained_steps
from pcpo_hydra.rollout import Trajectories


@dataclass(frozen=True)
class Schedule:
    """How an update walks an epoch's (sample, step) pairs; the default is DDPO's, which GRPO and PCPO use.

    `unit` consecutive samples train together, at the same steps (SDPO's pairs of one prompt).
    `steps_major`: each slot of train.steps_per_forward step positions is trained across all
    micro-batches before the next slot, with train.num_updates optimizer steps per slot (SDPO);
    otherwise each micro-batch runs all its trained steps, with train.num_updates optimizer steps
    per inner epoch (DDPO). The shuffles draw a random order of the units and of each unit's steps.
    """

    unit: int = 1
    steps_major: bool = False
    shuffle_batch: bool = True
    shuffle_steps: bool = True


def _step_order(n: int, steps: int, trained: int, generator: torch.Generator, shuffle: bool = True) -> Tensor:
    """Per-sample order of the sampler steps (random, or in sampling order), truncated to the `trained` first (DDPO)."""
    if not shuffle:
        return torch.arange(steps).expand(n, -1)[:, :trained]
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


def _members(units: Tensor, steps: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(sample rows, steps) of every member of the given units, a unit's members consecutive."""
    rows = (units[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)
    return rows, steps.repeat_interleave(size)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of the update: its samples, the steps trained of each, and its loss scale."""

    rows: Tensor    # sample indices into the trajectories
    steps: Tensor   # [len(rows), trained] step indices of each sample
    scale: float    # 0 for padding; else what makes an optimizer step the mean over the samples it trained on


def micro_batches(
    kept: Tensor, dropped: Tensor, counts: list[int], rank: int, batch_size: int, per_update: int,
    steps: int, trained: int, generator: torch.Generator, schedule: Schedule = Schedule(),
) -> list[MicroBatch]:
    """One inner epoch's micro-batches on rank `rank`: its `kept` samples shuffled, then padding.

    `counts` holds every rank's number of kept samples. Every rank must make the same number of
    forward, backward and optimizer calls, or ZeRO's collectives hang. When ranks keep different
    numbers (rollout.drop_flat_groups), each runs as many micro-batches as the rank with the most,
    rounded up to whole optimizer steps (the accelerator's accumulation count is fixed), and fills
    the ones it lacks with `dropped` samples at loss scale 0: padding only where a rank would
    otherwise wait for the others. (Taking the minimum over ranks instead would leave kept samples
    untrained.) Whole micro-batches of padding always fit: a rank keeping k of its n samples pads
    at most n - k of them, as the rounded-up count never exceeds the full update's. A real
    micro-batch's loss is scaled by its samples x ranks x `per_update` / the optimizer step's
    samples over all ranks, so each step's gradient is the mean over the samples it trained on, as
    when nothing is dropped (then every count is n and every scale exactly 1).
    """
    per_rank = max(math.ceil(count / batch_size) for count in counts)
    total = math.ceil(per_rank / per_update) * per_update
    sizes = [[min(batch_size, max(0, count - j * batch_size)) for j in range(total)] for count in counts]
    in_step = [sum(size[j] for size in sizes for j in range(u, u + per_update)) for u in range(0, total, per_update)]
    order = (torch.randperm(len(kept), generator=generator) if schedule.shuffle_batch
             else torch.arange(len(kept))).to(kept.device)
    step_order = _step_order(len(kept), steps, trained, generator, schedule.shuffle_steps).to(kept.device)
    real = [(kept[p], step_order[p]) for p in order.split(batch_size) if len(p)]  # split(0 rows) gives one empty
    padding = dropped[: (total - len(real)) * batch_size].split(batch_size)
    pads = [(rows, torch.arange(trained, device=rows.device).expand(len(rows), -1)) for rows in padding if len(rows)]
    scale = [size * len(counts) * per_update / in_step[j // per_update] for j, size in enumerate(sizes[rank])]
    return [MicroBatch(rows, k, s) for (rows, k), s in zip(real + pads, scale)]


def _counts_over_ranks(count: int, accelerator: Accelerator) -> list[int]:
    """Every rank's `count`, in rank order: the same list on every rank."""
    if accelerator.num_processes == 1:
        return [count]
    return accelerator.gather(torch.tensor([count], device=accelerator.device)).tolist()


def _means_over_ranks(totals: dict[str, Tensor], forwards: int, accelerator: Accelerator) -> dict[str, float]:
    """train/<key>: each statistic's mean over the trained forwards of all ranks, which may differ in number.

    Padding forwards add zeros to `totals`, so every rank holds the same keys for the reduction.
    """
    keys = sorted(totals)
    values = torch.stack([*(totals[key].double() for key in keys),
                          torch.tensor(float(forwards), dtype=torch.float64, device=accelerator.device)])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    *sums, count = values.tolist()
    return {f"train/{key}": value / max(count, 1) for key, value in zip(keys, sums)}


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


def _schedule(batches: list[MicroBatch], per_forward: int, steps_major: bool
              ) -> Iterator[tuple[MicroBatch, Tensor, Tensor, float]]:
    """(micro-batch, unit rows, steps, weight) of every forward of an inner epoch, in the schedule's order."""
    if not steps_major:
        for batch in batches:
            for rows, steps, weight in _forwards(batch.rows, batch.steps, per_forward):
                yield batch, rows, steps, weight
        return
    trained = batches[0].steps.shape[1] if batches else 0
    for j in range(0, trained, per_forward):
        for batch in batches:  # one forward per micro-batch and slot: its whole loss, weight 1
            rows, steps, _ = next(_forwards(batch.rows, batch.steps[:, j : j + per_forward], per_forward))
            yield batch, rows, steps, 1.0


def update_policy(
    traj: Trajectories,
    model,
    sampler,
    policy,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    train: DictConfig,
    generator: torch.Generator,
    schedule: Schedule = Schedule(),
) -> dict[str, float]:
    """`train.inner_epochs` passes over the samples `traj.kept` marks (all if None); returns each statistic's mean.

    `traj.advantages` is one per sample ([N]) or one per sample and stored step ([N, K], SDPO).
    A unit of `schedule.unit` samples trains only if all its members are kept.
    """
    n, steps = traj.log_probs.shape
    trained = trained_steps(steps, train.timestep_fraction)
    params = model.trainable_parameters()
    device = traj.latents.device
    kept = torch.ones(n, dtype=torch.bool, device=device) if traj.kept is None else traj.kept
    kept = kept.view(-1, schedule.unit).all(1)
    counts = _counts_over_ranks(int(kept.sum()), accelerator)
    # micro-batches per optimizer step, as the accelerator counts them (build.accumulation_steps)
    forwards_per_batch = 1 if schedule.steps_major else math.ceil(trained / train.steps_per_forward)
    per_update = accelerator.gradient_accumulation_steps // forwards_per_batch
    per_step = traj.advantages.dim() == 2
    totals: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    forwards, grad_norms, skipped, in_a_row = 0, [], 0, 0
    for _ in range(train.inner_epochs):
        batches = micro_batches(kept.nonzero().flatten(), (~kept).nonzero().flatten(), counts,
                                accelerator.process_index, train.batch_size // schedule.unit, per_update,
                                steps, trained, generator, schedule)
        for batch, units, unit_steps, weight in _schedule(batches, train.steps_per_forward, schedule.steps_major):
            r, k = _members(units, unit_steps, schedule.unit)
            x, i = traj.latents[r, k], k + traj.first_step  # stored step k is sampler step i
            cond = {key: value[r] for key, value in traj.cond.items()}
            t = sampler.timestep(i)
            f_ref = model.predict_reference(x, t, cond).float() if policy.kl_beta else None
            with accelerator.accumulate(model.network):
                f_new = model.predict(x, t, cond).float()
                loss, stats = policy.step_loss(
                    i, sampler, x, traj.latents[r, k + 1], traj.noise[r, k], traj.outputs[r, k], f_new,
                    traj.log_probs[r, k], traj.advantages[r, k] if per_step else traj.advantages[r], f_ref,
                )
                bad = _any_rank(not torch.isfinite(loss).item(), accelerator)
                accelerator.backward(_zero_loss(params) if bad else loss * (weight * batch.scale))
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
            padding = batch.scale == 0.0
            for key, value in {"loss": loss, **stats}.items():
                totals[key] += 0.0 if padding else value.detach()
            forwards += not padding
    means = _means_over_ranks(totals, forwards, accelerator)
    norms = [float(g) for g in grad_norms if g is not None]
    means["train/grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
    means["train/num_updates"] = float(len(grad_norms))
    means["train/nan_steps"] = float(skipped)
    return means
