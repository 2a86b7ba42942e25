"""The update step: how (sample, step) pairs are grouped into forwards must not change the gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from pcpo_hydra.algorithms import PolicyGradient
from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.rollout import sample_trajectories
from pcpo_hydra.samplers import build_ddim_sampler
from pcpo_hydra.update import update_policy

STEPS, SAMPLES, BATCH = 4, 4, 2


@pytest.fixture(scope="module")
def setup():
    model = build_tiny_sd(seed=0, resolution=16, guidance_scale=3.0)
    policy = PolicyGradient("log_hinge", "matching", "proportional", "reweight", 1e-4, 5.0)
    sampler = policy.prepare(build_ddim_sampler(model, STEPS, 1.0))
    traj = sample_trajectories(model, sampler, ["cat", "cat", "dog", "dog"], 4, [torch.Generator().manual_seed(0)])
    traj.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return model, sampler, policy, traj


def one_update(setup, steps_per_forward: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Weights after one SGD step (lr 1: weights move by minus the accumulated gradient) and the stats."""
    model, sampler, policy, traj = setup
    model = copy.deepcopy(model)
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=1.0)
    accumulation = SAMPLES // BATCH * math.ceil(STEPS / steps_per_forward)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    train = OmegaConf.create({"batch_size": BATCH, "inner_epochs": 1, "timestep_fraction": 1.0,
                              "steps_per_forward": steps_per_forward, "max_grad_norm": 1e9,
                              "max_nan_steps": 20})
    stats = update_policy(traj, model, sampler, policy, optimizer, accelerator, train,
                          torch.Generator().manual_seed(1))
    return {name: p.detach().clone() for name, p in model.network.named_parameters()}, stats


@pytest.mark.parametrize("steps_per_forward", [STEPS, 3])  # 3: groups of 3 and 1 steps, weighted by size
def test_grouping_steps_into_forwards_leaves_the_update_unchanged(setup, steps_per_forward):
    before = {name: p.detach().clone() for name, p in setup[0].network.named_parameters()}
    one_by_one, stats_1 = one_update(setup, 1)
    grouped, stats_k = one_update(setup, steps_per_forward)
    moved = sum(float((one_by_one[n] - before[n]).abs().sum()) for n in before)
    assert moved > 0  # the update did something
    for name in before:
        expected, got = one_by_one[name] - before[name], grouped[name] - before[name]
        # float32 sums over batches of other sizes round differently: compare at the update's scale
        error = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
    assert stats_1["train/num_updates"] == stats_k["train/num_updates"] == 1
