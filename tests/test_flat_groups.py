"""`rollout.drop_flat_groups`: groups of equal rewards (zero advantage) are left out of the update, and counted."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from pcpo_hydra.algorithms import PolicyGradient
from pcpo_hydra.algorithms.advantages import flat_groups, group_advantages
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.rollout import Trajectories, sample_trajectories
from pcpo_hydra.samplers import build_ddim_sampler
from pcpo_hydra.update import micro_batches, update_policy

STEPS, GROUP, BATCH = 3, 2, 2
NAN, INF = float("nan"), float("inf")


def test_flat_groups_are_those_whose_finite_rewards_all_equal() -> None:
    rewards = torch.tensor([
        1.0, 1.0, 1.0,      # flat
        1.0, 1.0, 1.0001,   # a spread of 1e-4: normalised by (std + 1e-4), advantages up to 0.45 that train
        0.3, NAN, 0.3,      # flat among its finite rewards
        2.0, NAN, INF,      # one finite reward: flat (group_advantages gives it zeros)
        NAN, NAN, NAN,      # none finite: flat
        -5.0, 0.0, 5.0,
    ])
    flat = flat_groups(rewards, 3)
    assert flat.tolist() == [True, False, True, True, True, False]
    advantages = group_advantages(rewards, 3).reshape(-1, 3)
    assert advantages[flat].abs().max() == 0.0  # what is dropped would have trained nothing
    assert advantages[1].abs().max() > 0.4


@pytest.mark.parametrize(
    ("counts", "rank", "sizes", "scales"),
    [
        ([8, 8], 0, [2, 2, 2, 2], [1.0, 1.0, 1.0, 1.0]),  # nothing dropped: every scale exactly 1
        ([4, 8], 0, [2, 2, 2, 2], [2 * 2 * 2 / 8, 2 * 2 * 2 / 8, 0.0, 0.0]),  # 8 samples in step 1, 4 in step 2
        ([4, 8], 1, [2, 2, 2, 2], [1.0, 1.0, 2 * 2 * 2 / 4, 2 * 2 * 2 / 4]),
        ([3, 0], 0, [2, 1], [2 * 2 * 2 / 3, 1 * 2 * 2 / 3]),  # rank 1 pads the step rank 0 trains
        ([3, 0], 1, [2, 2], [0.0, 0.0]),
        ([0, 0], 0, [], []),  # everything flat everywhere: no update at all
    ],
)
def test_micro_batches_give_every_rank_the_same_calls_and_each_step_the_mean_of_its_samples(
    counts, rank, sizes, scales
) -> None:
    n = 8
    kept = torch.arange(counts[rank])
    dropped = torch.arange(counts[rank], n)
    plan = micro_batches(kept, dropped, counts, rank, batch_size=2, per_update=2, steps=STEPS, trained=STEPS,
                         generator=torch.Generator().manual_seed(0))
    assert len(plan) == len(scales)  # the same on both ranks of a case
    assert [len(batch.rows) for batch in plan] == sizes
    assert [batch.scale for batch in plan] == pytest.approx(scales, rel=1e-12)
    trained = [k for b in plan if b.scale > 0 for k in b.rows.tolist()]
    assert sorted(trained) == kept.tolist()  # every kept sample once
    assert all(set(b.rows.tolist()) <= set(dropped.tolist()) for b in plan if b.scale == 0)  # padding: dropped ones
    assert all(b.steps.shape == (len(b.rows), STEPS) for b in plan)


@pytest.fixture(scope="module")
def setup():
    """Eight samples in four groups of two; the advantages say groups 1 and 3 are flat."""
    model = build_tiny_sd(seed=0, resolution=16, guidance_scale=3.0)
    policy = PolicyGradient("log_hinge", "matching", "proportional", "reweight", 1e-4, 5.0)
    sampler = policy.prepare(build_ddim_sampler(model, STEPS, 1.0))
    prompts = [p for p in ("cat", "dog", "fox", "owl") for _ in range(GROUP)]
    traj = sample_trajectories(model, sampler, prompts, 8, [torch.Generator().manual_seed(0)])
    traj.rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 0.5, -0.5, 7.0, 7.0])
    traj.advantages = group_advantages(traj.rewards, GROUP)
    return model, sampler, policy, traj


def subset(traj: Trajectories, rows: list[int]) -> Trajectories:
    """The trajectories of `rows` alone, as if the rollout had made only them."""
    index = torch.tensor(rows)
    per_sample = {f.name: getattr(traj, f.name) for f in dataclasses.fields(traj)
                  if isinstance(getattr(traj, f.name), torch.Tensor)}
    return dataclasses.replace(traj, prompts=[traj.prompts[k] for k in rows],
                               cond={k: v[index] for k, v in traj.cond.items()},
                               **{name: value[index] for name, value in per_sample.items()})


def one_update(setup, traj: Trajectories, micro_batches_per_step: int):
    """Weights after the update (SGD at lr 1: they move by minus the gradient) and its statistics."""
    model, sampler, policy, _ = setup
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=micro_batches_per_step)  # steps_per_forward = all
    train = OmegaConf.create({"batch_size": BATCH, "inner_epochs": 1, "timestep_fraction": 1.0,
                              "steps_per_forward": STEPS, "max_grad_norm": 1e9, "max_nan_steps": 20})
    stats = update_policy(traj, model, sampler, policy, optimizer, accelerator, train, torch.Generator().manual_seed(1))
    return [p.detach().clone() for p in model.trainable_parameters()], stats


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    moved = max(float((e - s).abs().max()) for e, s in zip(expected, start))
    return max(float((g - e).abs().max()) for g, e in zip(got, expected)) / moved


@pytest.mark.parametrize(
    ("kept_groups", "alone_per_step"),
    [([0, 2], 2),  # four samples: one whole optimizer step of two micro-batches, as when they were all there is
     ([2], 1)],    # two samples: one micro-batch and one of padding; the step is their mean, as alone
)
def test_dropping_flat_groups_equals_updating_on_the_kept_samples_alone(setup, kept_groups, alone_per_step) -> None:
    model, _, _, traj = setup
    start = [p.detach().clone() for p in model.trainable_parameters()]
    rows = [g * GROUP + j for g in kept_groups for j in range(GROUP)]
    dropping = dataclasses.replace(traj, kept=torch.tensor([k in rows for k in range(len(traj))]))
    dropped, stats = one_update(setup, dropping, micro_batches_per_step=2)
    alone, alone_stats = one_update(setup, subset(traj, rows), micro_batches_per_step=alone_per_step)
    everything, _ = one_update(setup, traj, micro_batches_per_step=2)
    assert relative_error(dropped, alone, start) < 1e-5
    assert relative_error(everything, alone, start) > 1e-2  # not what training on every sample does
    assert stats["train/num_updates"] == alone_stats["train/num_updates"] == 1
    for key in ("train/loss", "train/approx_kl", "train/clipfrac", "train/log_ratio_abs"):
        assert stats[key] == pytest.approx(alone_stats[key], rel=1e-5, abs=1e-12), key


def test_an_epoch_whose_groups_are_all_flat_skips_its_update(setup) -> None:
    model, _, _, traj = setup
    start = [p.detach().clone() for p in model.trainable_parameters()]
    nothing = dataclasses.replace(traj, kept=torch.zeros(len(traj), dtype=torch.bool))
    weights, stats = one_update(setup, nothing, micro_batches_per_step=2)
    assert all(torch.equal(a, b) for a, b in zip(weights, start))
    assert stats["train/num_updates"] == 0 and stats["train/nan_steps"] == 0
    assert math.isnan(stats["train/grad_norm"]) and "train/loss" not in stats


TINY = ["experiment=debug", "sampler.num_steps=2", "rollout.prompts_per_epoch=4", "rollout.group_size=2",
        "rollout.batch_size=8", "train.batch_size=2", "train.num_updates=2", "hardware.num_threads=1",
        "checkpoint_every=0", "log_images_every=0"]


class FlatFor:
    """The run's reward, made constant for the samples of the prompts named."""

    def __init__(self, real, prompts: set[str]) -> None:
        self.real, self.prompts, self.name = real, prompts, "flat_for"

    def score_parts(self, images, prompts):
        rewards, parts = self.real.score_parts(images, prompts)
        flat = torch.tensor([p in self.prompts for p in prompts])
        return torch.where(flat, torch.tensor(-1.0), rewards), parts


@pytest.mark.parametrize("drop", [False, True])
def test_the_trainer_counts_flat_groups_always_and_leaves_them_out_only_when_asked(compose_cfg, tmp_path: Path, drop) -> None:
    from pcpo_hydra.build import build_trainer

    trainer = build_trainer(validate(compose_cfg(*TINY, f"rollout.drop_flat_groups={drop}")), tmp_path, track=False)
    prompts = trainer.layout.draw_prompts(trainer.parts.prompts, torch.Generator().manual_seed(trainer.cfg.seed + 1))
    first = prompts[0]  # the epoch's draws are the trainer's own (same stream, same seed)
    trainer.parts.reward = FlatFor(trainer.parts.reward, {first})
    traj, rewards, stats = trainer.run_epoch(1)
    metrics = trainer.epoch_metrics(traj, rewards, stats)
    flat = [traj.prompts[g * 2] == first for g in range(4)]
    assert metrics["rollout/flat_groups"] == sum(flat) >= 1
    if drop:
        assert traj.kept.tolist() == [not f for f in flat for _ in range(2)]
        # 8 samples in 4 micro-batches, 2 per step; the kept ones need ceil(kept / 2 / 2) steps
        assert stats["train/num_updates"] == math.ceil((4 - sum(flat)) / 2)
    else:
        assert traj.kept is None and stats["train/num_updates"] == 2


def test_an_epoch_of_flat_groups_only_skips_the_update_and_logs_zero_updates(compose_cfg, tmp_path: Path) -> None:
    from pcpo_hydra.build import build_trainer

    trainer = build_trainer(validate(compose_cfg(*TINY, "rollout.drop_flat_groups=true")), tmp_path, track=False)
    trainer.parts.reward = FlatFor(trainer.parts.reward, set(trainer.parts.prompts.prompts))
    before = [p.detach().clone() for p in trainer.parts.model.trainable_parameters()]
    traj, rewards, stats = trainer.run_epoch(1)
    metrics = trainer.epoch_metrics(traj, rewards, stats)
    assert metrics["rollout/flat_groups"] == 4 and metrics["train/num_updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(trainer.parts.model.trainable_parameters(), before))


def test_per_prompt_advantages_refuse_drop_flat_groups_in_one_line(compose_cfg) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg("rollout.drop_flat_groups=true", "algorithm.advantage=per_prompt"))
    assert str(error.value) == (
        "invalid configuration: rollout.drop_flat_groups=true: needs algorithm.advantage='group' (got 'per_prompt'), "
        "the only advantages that are zero for a group of equal rewards; set rollout.drop_flat_groups=false"
    )
    validate(compose_cfg("rollout.drop_flat_groups=true"))  # group advantages: accepted
