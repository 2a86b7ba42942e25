"""PolicyGradient.step_loss: every switch, checked against the formulas written out by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from pcpo_hydra.algorithms import PolicyGradient
from pcpo_hydra.algorithms.credit import reweight_scales
from pcpo_hydra.samplers import DDIMSampler

SAMPLER = DDIMSampler(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), 10)
B = 4


def policy(objective="ratio", log_ratio="matching", credit="native", mode=None, clip=1e-4):
    pg = PolicyGradient(objective, log_ratio, credit, mode, clip_range=clip, adv_clip_max=5.0)
    return pg, pg.prepare(SAMPLER)


def rollout(sampler, i, dtype=torch.float32, d_scale=0.0):
    """x, prev, z, f_old, f_new (a leaf with grad), log_prob_old and advantages of step i."""
    g = torch.Generator().manual_seed(i)
    x, f_old, z, d = (torch.randn(B, 2, 3, 3, generator=g, dtype=dtype) for _ in range(4))
    prev, _, _ = sampler.step(i, x, f_old, z)
    f_new = (f_old + d_scale * d).requires_grad_()
    adv = torch.tensor([1.5, -0.5, 2.0, -1.0], dtype=dtype)
    return x, prev, z, f_old, f_new, sampler.log_prob(i, x, f_old, prev), adv


@pytest.mark.parametrize("objective", ["ratio", "log_hinge"])
@pytest.mark.parametrize("log_ratio", ["direct", "matching"])
@pytest.mark.parametrize("credit", ["native", "proportional"])
def test_no_change_gives_zero_log_ratio_and_the_first_order_gradient(objective, log_ratio, credit):
    pg, sampler = policy(objective, log_ratio, credit)
    i = 6
    x, prev, z, f_old, f_new, lp_old, adv = rollout(sampler, i)
    loss, stats = pg.step_loss(i, sampler, x, prev, z, f_old, f_new, lp_old, adv)
    # At rho = 1 the ratio loss is -A and the log-hinge loss -A * 0.
    expected = -adv.mean() if objective == "ratio" else torch.tensor(0.0)
    assert torch.allclose(loss, expected)
    assert set(stats) == {"policy_loss", "approx_kl", "clipfrac", "log_ratio_abs"}
    assert float(stats["policy_loss"]) == float(loss.detach())
    assert all(float(stats[key]) == 0.0 for key in ("approx_kl", "clipfrac", "log_ratio_abs"))
    loss.backward()
    # d log rho / d f_new at D = 0 is (b / s) z / n per sample, for both routes.
    _, b, s = sampler.coefficients(i)
    n = x[0].numel()
    hand = -(adv * pg.scales[i]).view(B, 1, 1, 1) * (b / s) * z / (n * B)
    assert torch.isfinite(f_new.grad).all()
    assert torch.allclose(f_new.grad, hand.float(), rtol=1e-4, atol=1e-9)


def formula_loss(objective, scale, b, s, z, d, adv, eps):
    """The loss of docs/design.md ("Objectives: GRPO and PCPO") in float64, written out independently of the package."""
    log_rho = ((b / s) * z * d - b**2 / (2 * s**2) * d**2).flatten(1).mean(1)
    r = scale * log_rho
    if objective == "ratio":
        rho = r.exp()
        return torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps)).mean()
    return torch.maximum(-adv * r, -adv * r.clamp(-eps, eps)).mean()


@pytest.mark.parametrize("objective", ["ratio", "log_hinge"])
@pytest.mark.parametrize("log_ratio", ["direct", "matching"])
def test_loss_and_gradient_match_the_formula(objective, log_ratio):
    pg, sampler = policy(objective, log_ratio, "proportional", "reweight", clip=2e-3)
    i = 8
    x, prev, z, f_old, f_new, lp_old, adv = rollout(sampler, i, torch.float64, d_scale=0.02)
    loss, stats = pg.step_loss(i, sampler, x, prev, z, f_old, f_new, lp_old, adv)
    loss.backward()
    _, b, s = sampler.coefficients(i)
    f_ref = f_new.detach().clone().requires_grad_()
    ref = formula_loss(objective, pg.scales[i], b, s, z, f_ref - f_old, adv, 2e-3)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-9)
    assert torch.allclose(f_new.grad, f_ref.grad, rtol=1e-7, atol=1e-12)
    assert float(stats["clipfrac"]) > 0.0  # the chosen D moves samples outside the clip interval


def test_per_sample_steps_match_a_loop_over_steps():
    pg, sampler = policy("log_hinge", "direct", "proportional", "reweight", clip=1.0)
    x, prev, z, f_old, f_new, _, adv = rollout(sampler, 0, d_scale=0.1)
    steps = torch.tensor([0, 3, 9, 3])
    prev, _, _ = sampler.step(steps, x, f_old, z)
    lp_old = sampler.log_prob(steps, x, f_old, prev)
    loss, _ = pg.step_loss(steps, sampler, x, prev, z, f_old, f_new, lp_old, adv)
    rows = [pg.step_loss(int(k), sampler, x[j : j + 1], prev[j : j + 1], z[j : j + 1],
                         f_old[j : j + 1], f_new[j : j + 1], lp_old[j : j + 1], adv[j : j + 1])[0]
            for j, k in enumerate(steps.tolist())]
    assert torch.allclose(loss, torch.stack(rows).mean(), rtol=1e-5)


def test_prepare_follows_the_sampler_family_default():
    pg, sampler = policy("log_hinge", "matching", "proportional", None)
    assert sampler is SAMPLER  # DDIM default: reweight mode, the rollout keeps the native stds
    assert torch.equal(pg.scales, reweight_scales(SAMPLER))
    assert not torch.equal(policy(credit="proportional", mode="variance")[1].stds(), SAMPLER.stds())
    assert policy(credit="native", mode="variance")[1] is SAMPLER


def test_misuse_is_reported():
    with pytest.raises(ValueError, match="algorithm.objective"):
        PolicyGradient("ppo", "direct", "native", None, 1e-4, 5.0)
    pg = PolicyGradient("ratio", "direct", "native", None, 1e-4, 5.0)
    x, prev, z, f_old, f_new, lp_old, adv = rollout(SAMPLER, 1)
    with pytest.raises(RuntimeError, match="prepare"):
        pg.step_loss(1, SAMPLER, x, prev, z, f_old, f_new, lp_old, adv)
