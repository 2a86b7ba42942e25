"""The KL penalty to the reference policy: its formula, its place in the loss, and the reference itself."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence

from pcpo_hydra.algorithms import PolicyGradient
from pcpo_hydra.algorithms.policy_gradient import gaussian_kl
from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.samplers import DDIMSampler, FlowGRPOSampler, sd3_sigmas

LORA = {"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
SAMPLERS = {
    "ddim": DDIMSampler(DDIMScheduler(set_alpha_to_one=False, steps_offset=1), 10),
    "flowgrpo": FlowGRPOSampler(sd3_sigmas(10), 0.7),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("i", [0, 4, 9])
def test_gaussian_kl_is_the_kl_of_the_two_step_gaussians_averaged_per_element(name: str, i: int) -> None:
    sampler = SAMPLERS[name]
    g = torch.Generator().manual_seed(i)
    x, f_new, f_ref = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    _, mu_new, s = sampler.step(i, x, f_new, torch.zeros_like(x))
    _, mu_ref, _ = sampler.step(i, x, f_ref, torch.zeros_like(x))
    expected = kl_divergence(Normal(mu_new, s), Normal(mu_ref, s)).flatten(1).mean(1)
    _, b, s = sampler.coefficients(i)
    torch.testing.assert_close(gaussian_kl(b, s, f_new, f_ref), expected, rtol=1e-10, atol=0)
    assert torch.equal(gaussian_kl(b, s, f_new, f_new), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("objective,log_ratio", [("ratio", "direct"), ("log_hinge", "matching")])
def test_step_loss_adds_beta_times_the_mean_kl_and_logs_it(objective: str, log_ratio: str) -> None:
    sampler, i, beta = SAMPLERS["flowgrpo"], 3, 0.04
    plain = PolicyGradient(objective, log_ratio, "native", None, 1e-4, 5.0)
    with_kl = PolicyGradient(objective, log_ratio, "native", None, 1e-4, 5.0, kl_beta=beta)
    g = torch.Generator().manual_seed(0)
    x, f_old, z, f_ref = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(4))
    prev, _, _ = sampler.step(i, x, f_old, z)
    f_new = f_old + 0.01 * torch.randn(4, 2, 3, 3, generator=g)
    args = (i, sampler, x, prev, z, f_old, f_new, sampler.log_prob(i, x, f_old, prev), torch.tensor([1.0, -1.0, 0.5, -0.5]))
    for pg in (plain, with_kl):
        pg.prepare(sampler)
    base, base_stats = plain.step_loss(*args)
    loss, stats = with_kl.step_loss(*args, f_ref)
    _, b, s = sampler.coefficients(i)
    kl = gaussian_kl(b, s, f_new, f_ref).mean()
    assert "kl_loss" not in base_stats and float(stats["kl_loss"]) == pytest.approx(float(kl), rel=1e-6)
    assert float(stats["policy_loss"]) == float(base)
    assert float(loss) == pytest.approx(float(base) + beta * float(kl), rel=1e-6)
    with pytest.raises(ValueError, match="f_ref"):
        with_kl.step_loss(*args)


def test_negative_beta_is_rejected_naming_the_key() -> None:
    with pytest.raises(ValueError, match="algorithm.kl_beta"):
        PolicyGradient("ratio", "direct", "native", None, 1e-4, 5.0, kl_beta=-0.1)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_reference_is_the_initial_policy_and_stays_it_while_the_policy_trains(lora) -> None:
    model = build_tiny_sd(seed=0, lora=lora)
    model.keep_reference()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *model.latent_shape, generator=g)
    cond = model.encode(["a cat", "a dog"])
    t = torch.tensor(500)
    initial = model.predict(x, t, cond).detach()
    assert torch.equal(model.predict_reference(x, t, cond), initial)

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    for _ in range(2):  # two steps: LoRA's B starts at 0, so one step moves only B
        model.predict(x, t, cond).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = model.predict(x, t, cond).detach()
    assert (moved - initial).abs().max() > 1e-4
    assert torch.equal(model.predict_reference(x, t, cond), initial)
    assert torch.equal(model.predict(x, t, cond).detach(), moved)  # adapters are back on afterwards
    if lora is None:  # a frozen copy: nothing the optimizer could move
        with model.weights.reference(model.network) as reference:
            assert reference is not model.network and not any(p.requires_grad for p in reference.parameters())


def test_full_fine_tuning_has_no_reference_until_kept() -> None:
    model = build_tiny_sd(seed=0)
    x = torch.zeros(1, *model.latent_shape)
    with pytest.raises(RuntimeError, match="kl_beta"):
        model.predict_reference(x, torch.tensor(1), model.encode(["a cat"]))
