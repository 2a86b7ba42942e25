"""The matching log-ratio equals the direct one exactly, and keeps its digits in float32."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from pcpo_hydra.algorithms import direct_log_ratio, matching_log_ratio
from pcpo_hydra.samplers import DDIMSampler

SAMPLER = DDIMSampler(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), 50)


def rollout(i: int, d_scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x, f_old, f_new = f_old + D, z and the sampled prev of step i, all in `dtype`."""
    g = torch.Generator().manual_seed(i)
    x, f_old, z, d = (torch.randn(8, 4, 32, 32, generator=g) for _ in range(4))
    f_new = f_old + d_scale * d
    x, f_old, f_new, z = (t.to(dtype) for t in (x, f_old, f_new, z))
    prev, _, _ = SAMPLER.step(i, x, f_old, z)
    return x, f_old, f_new, z, prev


def both_routes(i: int, x, f_old, f_new, z, prev) -> tuple[torch.Tensor, torch.Tensor]:
    direct = direct_log_ratio(SAMPLER.log_prob(i, x, f_new, prev), SAMPLER.log_prob(i, x, f_old, prev))
    _, b, s = SAMPLER.coefficients_for(i, x)
    return direct, matching_log_ratio(b, s, z, f_new, f_old)


def test_routes_agree_in_float64():
    for i in (0, 30, 49):
        direct, matching = both_routes(i, *rollout(i, 0.05, torch.float64))
        assert matching.shape == (8,) and matching.dtype == torch.float64
        assert torch.allclose(direct, matching, rtol=1e-9, atol=1e-15)


def test_matching_route_keeps_its_digits_in_float32():
    i = 25
    inputs = rollout(i, 1e-3, torch.float32)
    x, f_old, f_new, z, _ = inputs
    _, b, s = SAMPLER.coefficients_for(i, x.double())
    exact = matching_log_ratio(b, s, z.double(), f_new.double(), f_old.double())
    direct, matching = both_routes(i, *inputs)

    def rel_error(v: torch.Tensor) -> float:
        return float(((v.double() - exact).abs() / exact.abs()).median())

    assert rel_error(matching) < 1e-5
    assert rel_error(direct) > 1e-3  # ~1% here: two log-densities of ~-1.4 differ by ~4e-6
    assert rel_error(matching) * 1000 < rel_error(direct)


def test_matching_is_zero_without_change():
    x, f_old, _, z, _ = rollout(3, 0.0, torch.float32)
    _, b, s = SAMPLER.coefficients_for(3, x)
    assert torch.equal(matching_log_ratio(b, s, z, f_old, f_old), torch.zeros(8))
