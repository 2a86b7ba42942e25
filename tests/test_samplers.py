"""DDIM sampler: coefficients, step and log-prob against docs/design.md's formulas and diffusers' own step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from pcpo_hydra.samplers import BaseSampler, DDIMSampler, build_ddim_sampler

SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)


@pytest.fixture
def scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD15)


def hand_coefficients(scheduler: DDIMScheduler, t: int, eta: float) -> tuple[float, float, float]:
    """docs/design.md's DDIM a, b, sigma for training timestep t with 50 steps, in plain Python floats."""
    alphas = scheduler.alphas_cumprod.tolist()
    t_prev = t - 1000 // 50
    at = alphas[t]
    ap = alphas[t_prev] if t_prev >= 0 else float(scheduler.final_alpha_cumprod)
    sigma = eta * math.sqrt((1 - ap) / (1 - at)) * math.sqrt(1 - at / ap)
    a = math.sqrt(ap / at)
    b = math.sqrt(1 - ap - sigma**2) - math.sqrt(ap * (1 - at) / at)
    return a, b, sigma


def small_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 1, 2, 2, generator=g).to(dtype) for _ in range(3))


def test_timesteps_follow_the_scheduler(scheduler):
    sampler = DDIMSampler(scheduler, 50)
    assert sampler.num_steps == 50
    assert int(sampler.timestep(0)) == 981 and int(sampler.timestep(49)) == 1
    assert sampler.timestep(torch.tensor([0, 49])).tolist() == [981, 1]
    assert scheduler.num_inference_steps is None  # the caller's scheduler is left untouched


@pytest.mark.parametrize("i", [0, 17, 48, 49])  # 49 is the last step: t_prev < 0 -> final alpha
def test_coefficients_match_hand_formulas(scheduler, i):
    sampler = DDIMSampler(scheduler, 50, eta=1.0)
    a, b, s = sampler.coefficients(i)
    assert a.dtype == torch.float64 and a.dim() == 0
    expected = hand_coefficients(scheduler, int(sampler.timestep(i)), 1.0)
    assert [a.item(), b.item(), s.item()] == pytest.approx(expected, rel=1e-12)
    assert sampler.interval(i) == pytest.approx(0.02)


def test_step_and_log_prob_match_hand_values(scheduler):
    sampler = DDIMSampler(scheduler, 50, eta=0.7)
    x, f, z = small_inputs()
    for i in (5, 49):
        a, b, s = hand_coefficients(scheduler, int(sampler.timestep(i)), 0.7)
        prev, mean, std = sampler.step(i, x, f, z)
        assert torch.allclose(mean, a * x + b * f, rtol=1e-6, atol=1e-6)
        assert torch.allclose(prev, a * x + b * f + s * z, rtol=1e-6, atol=1e-6)
        assert float(std) == pytest.approx(s, rel=1e-6)
        lp = sampler.log_prob(i, x, f, prev)
        hand = [sum(-(zk * s) ** 2 / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
                    for zk in row) / len(row) for row in z.flatten(1).tolist()]
        assert lp.shape == (2,) and lp.dtype == torch.float32
        assert lp.tolist() == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_step_matches_diffusers(scheduler, eta):
    sampler = DDIMSampler(scheduler, 50, eta=eta)
    reference = DDIMScheduler(**SD15)
    reference.set_timesteps(50)
    x, f, z = small_inputs()
    for i, t in enumerate(reference.timesteps):
        expected = reference.step(f, t, x, eta=eta, variance_noise=z).prev_sample
        prev, _, _ = sampler.step(i, x, f, z)
        assert torch.allclose(prev, expected, rtol=1e-5, atol=1e-5), f"step {i}"


def test_sd15_native_weights(scheduler):
    w = DDIMSampler(scheduler, 50, eta=1.0).native_weights()
    assert w.shape == (50,) and w.dtype == torch.float64
    assert float(w.min()) == pytest.approx(1.117, abs=1e-3)
    assert float(w.max()) == pytest.approx(82.95, abs=1e-2)
    assert float(w.mean()) == pytest.approx(4.456, abs=1e-3)


def test_eta_zero_is_deterministic_and_has_no_density(scheduler):
    sampler = DDIMSampler(scheduler, 10, eta=0.0)
    x, f, z = small_inputs()
    prev, mean, _ = sampler.step(3, x, f, z)
    assert torch.equal(prev, mean)
    with pytest.raises(ValueError, match="eta"):
        sampler.native_weights()
    with pytest.raises(ValueError, match="eta"):
        sampler.log_prob(3, x, f, prev)


def test_per_sample_step_indices_match_int_indices(scheduler):
    sampler = DDIMSampler(scheduler, 50)
    x, f, z = small_inputs()
    idx = torch.tensor([3, 40])
    prev, mean, std = sampler.step(idx, x, f, z)
    lp = sampler.log_prob(idx, x, f, prev)
    for row, i in enumerate(idx.tolist()):
        p, m, _ = sampler.step(i, x[row : row + 1], f[row : row + 1], z[row : row + 1])
        assert torch.equal(prev[row : row + 1], p) and torch.equal(mean[row : row + 1], m)
        assert torch.allclose(lp[row], sampler.log_prob(i, x[row : row + 1], f[row : row + 1], p)[0])
    assert std.shape == (2, 1, 1, 1)


def test_half_precision_latents_keep_their_dtype(scheduler):
    sampler = DDIMSampler(scheduler, 50)
    x, f, z = small_inputs(torch.float16)
    prev, mean, _ = sampler.step(7, x, f, z)
    assert prev.dtype == mean.dtype == torch.float16
    assert sampler.log_prob(7, x, f, prev).dtype == torch.float32


def test_with_stds_recomputes_b_and_leaves_the_original(scheduler):
    sampler = DDIMSampler(scheduler, 50)
    stds = sampler.stds() * 0.5
    other = sampler.with_stds(stds)
    assert isinstance(other, BaseSampler)
    for i in (0, 49):
        a, b, s = other.coefficients(i)
        a0, b0, s0 = sampler.coefficients(i)
        expected_a, expected_b = sampler.coefficients_at(i, s0 * 0.5)
        assert float(s) == pytest.approx(0.5 * float(s0), rel=1e-15)
        assert float(a) == float(a0) == float(expected_a)
        assert float(b) == float(expected_b) != float(b0)
    assert torch.equal(sampler.stds(), stds * 2)
    hi = sampler.std_bounds(0)[1]
    with pytest.raises(ValueError, match="outside"):
        sampler.with_stds(torch.full((50,), 1.01 * hi))
    with pytest.raises(ValueError, match="50 stds"):
        sampler.with_stds(torch.ones(3))


def test_build_ddim_sampler_uses_the_model_scheduler(scheduler):
    sampler = build_ddim_sampler(SimpleNamespace(scheduler=scheduler), num_steps=20, eta=1.0)
    assert isinstance(sampler, DDIMSampler) and sampler.num_steps == 20
    assert DDIMSampler.default_credit_mode == "reweight"
