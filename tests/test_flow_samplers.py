"""Flow SDE samplers: docs/design.md's formulas by hand, schedules against diffusers, PCPO credit, config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from pcpo_hydra.algorithms import (
    PolicyGradient,
    credit_plan,
    direct_log_ratio,
    matching_log_ratio,
    proportional_weights,
)
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.registry import group_schemas
from pcpo_hydra.models.schemas import StableDiffusionSchema
from pcpo_hydra.samplers.base import instantiate_sampler
from pcpo_hydra.samplers import (
    DanceGRPOSampler,
    FlowGRPOSampler,
    build_dancegrpo_sampler,
    build_flowgrpo_sampler,
    flux_sigmas,
    sd3_sigmas,
    uniform_shifted_sigmas,
)

SIGMAS = [1.0, 0.75, 0.4, 0.1, 0.0]  # starts at sigma = 1 and ends at 0, with uneven steps
FLUX_CONFIG = dict(  # FLUX.1's scheduler_config.json
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def schedule() -> torch.Tensor:
    return torch.tensor(SIGMAS, dtype=torch.float64)


def dance_by_hand(i: int, eta: float, sigmas: list[float] = SIGMAS) -> tuple[float, float, float]:
    """DanceGRPO's a, b, s (docs/design.md, "The three samplers' coefficients") in plain floats."""
    sigma, ds = sigmas[i], sigmas[i + 1] - sigmas[i]
    return (1 + eta**2 * ds / (2 * sigma), ds * (1 + eta**2 * (1 - sigma) / (2 * sigma)), eta * math.sqrt(-ds))


def flow_by_hand(i: int, noise_level: float, sigmas: list[float] = SIGMAS) -> tuple[float, float, float]:
    """Flow-GRPO's a, b, s (docs/design.md) in plain floats, sigma_i' = sigmas[1] where sigma_i = 1."""
    sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
    std = noise_level * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
    return (1 + std**2 * dt / (2 * sigma), (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt, std * math.sqrt(-dt))


SAMPLERS = {
    "dancegrpo": (lambda sigmas: DanceGRPOSampler(sigmas, eta=0.3), lambda i: dance_by_hand(i, 0.3)),
    "flowgrpo": (lambda sigmas: FlowGRPOSampler(sigmas, noise_level=0.7), lambda i: flow_by_hand(i, 0.7)),
}


def inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


# ---- the step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SAMPLERS)
@pytest.mark.parametrize("i", range(4))  # 0: sigma = 1; 3: the last step, to sigma = 0
def test_coefficients_match_design(family, i):
    make, by_hand = SAMPLERS[family]
    sampler = make(schedule())
    a, b, s = sampler.coefficients(i)
    assert a.dtype == torch.float64 and a.dim() == 0
    assert [a.item(), b.item(), s.item()] == pytest.approx(by_hand(i), rel=1e-12)
    assert sampler.interval(i) == pytest.approx(SIGMAS[i] - SIGMAS[i + 1], rel=1e-15)


def test_first_and_last_step_values_worked_out_on_paper():
    dance, flow = DanceGRPOSampler(schedule(), 0.3), FlowGRPOSampler(schedule(), 0.7)
    coefficients = lambda sampler, i: [float(c) for c in sampler.coefficients(i)]  # noqa: E731
    # sigma = 1: the score term (1 - sigma) vanishes from b; Flow-GRPO's std uses sigmas[1] = 0.75.
    assert coefficients(dance, 0) == pytest.approx([0.98875, -0.25, 0.15], rel=1e-12)
    assert coefficients(flow, 0) == pytest.approx([0.755, -0.25, 0.7], rel=1e-12)  # std = 0.7 * 2
    # Last step, 0.1 -> 0: std^2 = 0.49 / 9 for Flow-GRPO.
    assert coefficients(dance, 3) == pytest.approx([0.955, -0.1405, 0.3 * math.sqrt(0.1)], rel=1e-12)
    assert coefficients(flow, 3) == pytest.approx([1 - 0.49 / 18, -0.1245, math.sqrt(0.049 / 9)], rel=1e-12)


def test_dancegrpo_step_equals_its_score_form():
    # The reference writes the step as an Euler step plus a score correction; docs/design.md folds it into a, b.
    sampler, (x, v, z) = DanceGRPOSampler(schedule(), 0.3), inputs(torch.float64)
    for i in range(4):
        sigma, ds = SIGMAS[i], SIGMAS[i + 1] - SIGMAS[i]
        x0 = x - sigma * v
        score = -(x - (1 - sigma) * x0) / sigma**2
        expected = x + ds * v - 0.5 * 0.09 * score * ds
        _, mean, _ = sampler.step(i, x, v, z)
        assert torch.allclose(mean, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", SAMPLERS)
def test_step_and_log_prob_by_hand(family):
    make, by_hand = SAMPLERS[family]
    sampler, (x, f, z) = make(schedule()), inputs()
    for i in (0, 3):
        a, b, s = by_hand(i)
        prev, mean, std = sampler.step(i, x, f, z)
        assert torch.allclose(mean, a * x + b * f, rtol=1e-6, atol=1e-6)
        assert torch.allclose(prev, a * x + b * f + s * z, rtol=1e-6, atol=1e-6)
        assert float(std) == pytest.approx(s, rel=1e-6)
        lp = sampler.log_prob(i, x, f, prev)
        density = lambda e: -(e**2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)  # noqa: E731
        hand = [sum(density(zk * s) for zk in row) / len(row) for row in z.flatten(1).tolist()]
        assert lp.dtype == torch.float32 and lp.tolist() == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("family", SAMPLERS)
def test_matching_log_ratio_equals_direct_in_float64(family):
    sampler = SAMPLERS[family][0](sd3_sigmas(10))
    x, f_old, z = inputs(torch.float64)
    f_new = f_old + 0.05 * inputs(torch.float64, seed=1)[0]
    for i in (0, 4, 9, torch.tensor([0, 9])):
        prev, _, _ = sampler.step(i, x, f_old, z)
        direct = direct_log_ratio(sampler.log_prob(i, x, f_new, prev), sampler.log_prob(i, x, f_old, prev))
        _, b, s = sampler.coefficients_for(i, x)
        matching = matching_log_ratio(b, s, z, f_new, f_old)
        assert matching.dtype == torch.float64
        assert torch.allclose(matching, direct, rtol=1e-9, atol=1e-13)


def test_exact_velocity_keeps_the_signal_on_schedule():
    # With v = x1 - x0 the mean is (1 - sigma') x0 + (sigma' - s^2 / (2 sigma)) x1 for any s: std_bounds' premise.
    sampler, (x0, x1, _) = FlowGRPOSampler(schedule(), 0.7), inputs(torch.float64)
    for i in range(4):
        sigma, after = SIGMAS[i], SIGMAS[i + 1]
        _, mean, std = sampler.step(i, (1 - sigma) * x0 + sigma * x1, x1 - x0, torch.zeros_like(x0))
        expected = (1 - after) * x0 + (after - float(std) ** 2 / (2 * sigma)) * x1
        assert torch.allclose(mean, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", SAMPLERS)
def test_std_bounds_hold_the_native_std_and_end_where_the_step_stops_denoising(family):
    sampler = SAMPLERS[family][0](sd3_sigmas(10))
    sigmas = sampler.sigmas.tolist()
    for i in range(10):
        lo, hi = sampler.std_bounds(i)
        assert lo == 0.0 and float(sampler.native_std(i)) <= hi
        if float(sampler.native_std(i)) < hi:  # the bound is the no-progress std: noise left = sigma_i
            left = (sigmas[i + 1] - hi**2 / (2 * sigmas[i])) ** 2 + hi**2
            assert left == pytest.approx(sigmas[i] ** 2, rel=1e-12)
    his = torch.tensor([sampler.std_bounds(i)[1] for i in range(10)], dtype=torch.float64)
    assert torch.equal(sampler.with_stds(his).stds(), his)
    with pytest.raises(ValueError, match="outside"):
        sampler.with_stds(his * 1.01)


def test_timestep_is_the_schedulers_sigma_times_1000():
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(10)
    sampler = FlowGRPOSampler(sd3_sigmas(10), 0.7)
    assert sampler.timestep(0).dtype == torch.float32 and float(sampler.timestep(0)) == 1000.0
    assert torch.allclose(torch.stack([sampler.timestep(i) for i in range(10)]), reference.timesteps, rtol=1e-6)
    assert sampler.timestep(torch.tensor([9, 0])).tolist() == [sampler.timestep(9).item(), 1000.0]


def test_bad_schedules_and_noise_are_rejected():
    with pytest.raises(ValueError, match="fall strictly"):
        DanceGRPOSampler(torch.tensor([1.0, 0.5, 0.5, 0.0]), 0.3)
    with pytest.raises(ValueError, match="fall strictly"):
        FlowGRPOSampler(torch.tensor([1.5, 0.5, 0.0]), 0.7)
    with pytest.raises(ValueError, match="1-D"):
        FlowGRPOSampler(torch.tensor([1.0]), 0.7)
    with pytest.raises(ValueError, match="sampler.eta"):
        DanceGRPOSampler(schedule(), 0.0)
    with pytest.raises(ValueError, match="sampler.noise_level"):
        FlowGRPOSampler(schedule(), -0.1)


# ---- schedules against diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 4, 10, 16, 28, 50])
def test_sd3_schedule_matches_diffusers(num_steps):
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3.5's config
    reference.set_timesteps(num_steps)
    ours = sd3_sigmas(num_steps, shift=3.0)
    assert ours.shape == (num_steps + 1,) and ours.dtype == torch.float64
    assert torch.allclose(ours, reference.sigmas.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 4, 12, 16, 28, 50])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 2025, 4096])  # 256 .. 1024 px; 2025: DanceGRPO's 720 px
def test_flux_schedule_matches_diffusers(num_steps, image_seq_len):
    reference = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)  # as FluxPipeline calls it
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    assert torch.allclose(flux_sigmas(num_steps, image_seq_len), reference.sigmas.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 4, 12, 16])
def test_dancegrpo_grid_is_a_statically_shifted_even_grid(num_steps):
    grid = [1 - k / num_steps for k in range(num_steps + 1)]
    by_hand = torch.tensor([3 * t / (1 + 2 * t) for t in grid], dtype=torch.float64)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    ours = uniform_shifted_sigmas(num_steps, 3.0)
    assert torch.allclose(ours, by_hand, rtol=1e-15, atol=0)
    assert torch.allclose(ours, reference.sigmas.double(), rtol=0, atol=1e-6)


# ---- PCPO's proportional credit ----------------------------------------------------------------


@pytest.mark.parametrize("family", SAMPLERS)
def test_native_weight_closed_form(family):
    sampler = SAMPLERS[family][0](sd3_sigmas(10))
    sigma, gap, s = sampler.sigmas[:-1], sampler.intervals(), sampler.stds()
    assert torch.allclose(sampler.native_weights(), gap / s**2 + (1 - sigma) / (2 * sigma), rtol=1e-12)
    if family == "dancegrpo":  # eta^2 |d| / s^2 = 1: the weight is 1/eta^2 plus the score term
        assert torch.allclose(sampler.native_weights(), 1 / 0.09 + (1 - sigma) / (2 * sigma), rtol=1e-12)


@pytest.mark.parametrize("family", SAMPLERS)
@pytest.mark.parametrize("mode", ["reweight", "variance"])
@pytest.mark.parametrize("schedule", ["sd3_10", "dancegrpo_16"])
def test_effective_weights_proportional_to_sigma_steps(family, mode, schedule):
    sigmas = sd3_sigmas(10) if schedule == "sd3_10" else uniform_shifted_sigmas(16, 3.0)
    sampler = SAMPLERS[family][0](sigmas)
    rollout, scales = credit_plan(sampler, "proportional", mode)
    effective = scales * rollout.native_weights()
    per_interval = effective / (sigmas[:-1] - sigmas[1:]).abs()
    assert torch.allclose(per_interval, per_interval[0].expand_as(per_interval), rtol=1e-11, atol=0)
    assert float(effective.mean()) == pytest.approx(float(sampler.native_weights().mean()), rel=1e-12)
    if mode == "reweight":
        assert rollout is sampler
        return
    target = proportional_weights(sampler.native_weights(), sampler.intervals())
    floor = (1 - sigmas[:-1]) / (2 * sigmas[:-1])  # the weight as s grows without bound
    for i, s in enumerate(rollout.stds().tolist()):
        lo, hi = sampler.std_bounds(i)
        assert lo < s <= hi
        if target[i] > floor[i]:  # a std with exactly the target weight: |d| / s^2 = target - floor
            reached = math.sqrt(sampler.interval(i) / float(target[i] - floor[i]))
            if reached <= hi:
                assert s == pytest.approx(reached, rel=1e-9) and float(scales[i]) == pytest.approx(1.0, rel=1e-9)


def test_flow_samplers_default_to_reweight():
    assert DanceGRPOSampler.default_credit_mode == FlowGRPOSampler.default_credit_mode == "reweight"
    sampler = FlowGRPOSampler(sd3_sigmas(10), 0.7)
    policy = PolicyGradient("log_hinge", "matching", "proportional", None, 1e-4, 5.0)
    assert policy.prepare(sampler) is sampler  # reweight keeps the reference sampler


# ---- builders and config -----------------------------------------------------------------------


class FakeFlowModel:
    """The one method a flow sampler asks of a model adapter."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def flow_sigmas(self, num_steps: int) -> torch.Tensor:
        self.asked.append(num_steps)
        return sd3_sigmas(num_steps)


@dataclass
class FakeFlowModelSchema(StableDiffusionSchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "tests.fake.flow_model"


@pytest.fixture
def flow_model_cfg(compose_cfg, monkeypatch):
    """compose_cfg with model=sd15 re-targeted to a registered fake flow model schema."""
    monkeypatch.setitem(group_schemas()["model"], FakeFlowModelSchema._target_, FakeFlowModelSchema)
    retarget = f"model._target_={FakeFlowModelSchema._target_}"
    return lambda *overrides: compose_cfg("model=sd15", retarget, *overrides)


def test_builders_ask_the_model_for_its_schedule():
    model = FakeFlowModel()
    flow = build_flowgrpo_sampler(model, num_steps=10, noise_level=0.7)
    assert isinstance(flow, FlowGRPOSampler) and torch.equal(flow.sigmas, sd3_sigmas(10))
    dance = build_dancegrpo_sampler(model, num_steps=16, eta=0.3)
    assert model.asked == [10, 16] and torch.equal(dance.sigmas, sd3_sigmas(16))
    own_grid = build_dancegrpo_sampler(model, num_steps=12, eta=0.3, shift=3.0)
    assert model.asked == [10, 16] and torch.equal(own_grid.sigmas, uniform_shifted_sigmas(12, 3.0))


def test_builders_reject_a_diffusion_model_and_a_wrong_schedule():
    with pytest.raises(TypeError, match=r"sampler=flowgrpo_sde needs a flow-matching model.*sampler=ddim"):
        build_flowgrpo_sampler(SimpleNamespace(scheduler=object()), num_steps=10, noise_level=0.7)
    with pytest.raises(TypeError, match="sampler=dancegrpo_sde"):
        build_dancegrpo_sampler(SimpleNamespace(scheduler=object()), num_steps=10, eta=0.3, shift=3.0)
    with pytest.raises(ValueError, match=r"expected \(11,\)"):
        build_flowgrpo_sampler(SimpleNamespace(flow_sigmas=lambda n: sd3_sigmas(n + 1)), 10, 0.7)


@pytest.mark.parametrize(
    ("option", "defaults", "sampler_type"),
    [("dancegrpo_sde", {"num_steps": 16, "eta": 0.3, "shift": None}, DanceGRPOSampler),
     ("flowgrpo_sde", {"num_steps": 10, "noise_level": 0.7}, FlowGRPOSampler)],
)
def test_flow_sampler_configs_validate_with_a_flow_model(flow_model_cfg, option, defaults, sampler_type):
    cfg = validate(flow_model_cfg(f"sampler={option}"))
    assert {k: v for k, v in cfg.sampler.items() if k not in ("_target_", "sde_window")} == defaults
    assert cfg.sampler.sde_window.size is None  # no window unless asked
    sampler = instantiate_sampler(cfg.sampler, FakeFlowModel())
    assert isinstance(sampler, sampler_type) and sampler.num_steps == defaults["num_steps"]


@pytest.mark.parametrize("model", ["tiny_sd", "sd15"])
@pytest.mark.parametrize("option", ["dancegrpo_sde", "flowgrpo_sde"])
def test_flow_sampler_with_a_diffusion_model_fails_validation(compose_cfg, model, option):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(f"model={model}", f"sampler={option}"))
    assert len(info.value.problems) == 1
    message = str(info.value)
    assert f"sampler._target_='pcpo_hydra.samplers.build_{option.split('_')[0]}_sampler'" in message
    assert "a flow sampler cannot step model._target_=" in message
    assert "a diffusion model; use sampler=ddim with it, or a flow model" in message


def test_ddim_with_a_flow_model_fails_validation(flow_model_cfg):
    with pytest.raises(ConfigError, match="a diffusion sampler cannot step .*a flow model; use sampler=dancegrpo_sde or sampler=flowgrpo_sde"):
        validate(flow_model_cfg("sampler=ddim"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(["sampler=dancegrpo_sde", "sampler.eta=0"], "sampler.eta=0.0: must be a number > 0"),
     (["sampler=dancegrpo_sde", "sampler.shift=-1"], "sampler.shift=-1.0: must be a number > 0"),
     (["sampler=flowgrpo_sde", "sampler.noise_level=0"], "sampler.noise_level=0.0: must be a number > 0"),
     (["sampler=flowgrpo_sde", "sampler.num_steps=0"], "sampler.num_steps=0: must be a number > 0")],
)
def test_flow_sampler_bounds(flow_model_cfg, overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(flow_model_cfg(*overrides))
    assert expected in str(info.value)
