"""Proportional credit: effective weights exactly proportional to the intervals, in both modes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from pcpo_hydra.algorithms import credit_plan, proportional_weights, variance_stds
from pcpo_hydra.samplers import BaseSampler, DDIMSampler

SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)


@pytest.fixture(scope="module")
def sampler() -> DDIMSampler:
    return DDIMSampler(DDIMScheduler(**SD15), 50, eta=1.0)


class TwoCrossings(BaseSampler):
    """One step whose weight |b|/s^2 = 1 + 10 (s - 0.5)^2 meets any level twice around s = 0.5."""

    def __init__(self, native: float) -> None:
        super().__init__(1)
        self.native = native

    def coefficients_at(self, i, s):
        return torch.ones((), dtype=torch.float64), s**2 * (1 + 10 * (s - 0.5) ** 2)

    def native_std(self, i):
        return torch.tensor(self.native, dtype=torch.float64)

    def std_bounds(self, i):
        return 0.0, 1.0

    def interval(self, i):
        return 1.0

    def timestep(self, i):
        return torch.tensor(0.0)


def test_proportional_weights_by_hand():
    w = proportional_weights(torch.tensor([1.0, 5.0, 6.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert w.tolist() == pytest.approx([3.0, 3.0, 6.0], rel=1e-15)


@pytest.mark.parametrize("mode", ["variance", "reweight"])
def test_effective_weights_are_exactly_proportional(sampler, mode):
    rollout, scales = credit_plan(sampler, "proportional", mode)
    effective = scales * rollout.native_weights()
    per_interval = effective / sampler.intervals()
    assert torch.allclose(per_interval, per_interval[0].expand(50), rtol=1e-12, atol=0)
    assert float(effective.mean()) == pytest.approx(float(sampler.native_weights().mean()), rel=1e-12)


def test_reweight_keeps_the_sampler(sampler):
    rollout, scales = credit_plan(sampler, "proportional", "reweight")
    assert rollout is sampler
    assert torch.allclose(scales, sampler.native_weights().mean() / sampler.native_weights())


def test_variance_mode_on_sd15_ddim50(sampler):
    stds, scales = variance_stds(sampler)
    ratio = stds / sampler.stds()
    his = torch.tensor([sampler.std_bounds(i)[1] for i in range(50)], dtype=torch.float64)
    assert bool(((stds > 0) & (stds <= his)).all())
    # Early and middle steps move to ~0.39-0.45 sigma and hit the target weight exactly.
    assert bool(((ratio[:30] > 0.38) & (ratio[:30] < 0.45)).all())
    assert float(ratio.median()) == pytest.approx(0.414, abs=0.01)
    assert torch.allclose(scales[:46], torch.ones(46, dtype=torch.float64), rtol=1e-9)
    # The last steps' weight stays above the target for every admissible std: they take the
    # std of least weight (an interior minimum) and the residual factor closes the gap.
    assert bool((scales[46:] < 1).all())
    for i in range(46, 50):
        grid = torch.linspace(1e-4, 1.0, 10001, dtype=torch.float64) * his[i]
        assert float(sampler.weight_at(i, stds[i])) <= float(sampler.weight_at(i, grid).min()) * (1 + 1e-9)


@pytest.mark.parametrize("native, expected", [(0.2, 0.2), (0.75, 0.75)])
def test_variance_picks_the_crossing_nearest_the_native_std(native, expected):
    # A single step's target equals its own weight, which is also met at 1 - native.
    stds, scales = variance_stds(TwoCrossings(native))
    assert float(stds[0]) == pytest.approx(expected, rel=1e-10)
    assert float(scales[0]) == pytest.approx(1.0, rel=1e-10)


def test_native_credit_is_the_identity(sampler):
    rollout, scales = credit_plan(sampler, "native", "variance")
    assert rollout is sampler and torch.equal(scales, torch.ones(50, dtype=torch.float64))


def test_unknown_choices_name_the_option(sampler):
    with pytest.raises(ValueError, match="algorithm.credit "):
        credit_plan(sampler, "uniform", "variance")
    with pytest.raises(ValueError, match="algorithm.credit_mode"):
        credit_plan(sampler, "proportional", "both")
