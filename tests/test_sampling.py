"""Implicit Reward Guidance is exact at its ends and linear between them, on a DDIM and a flow model.

Policies here are the tiny models with perturbed weights, saved by `save_trainable` exactly as a
run saves its final weights, and loaded back through `load_policy`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.models.tiny_sd3 import build_tiny_sd3
from pcpo_hydra.samplers import build_ddim_sampler, build_flowgrpo_sampler
from pcpo_hydra.sampling.guidance import GuidedModel, PolicyLoadError, load_policy, sample_images

PROMPTS, SEEDS = ["a cat", "a dog", "a cat"], [3, 4, 5]

SD_LORA = {"enabled": True, "rank": 2, "alpha": 2.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
SD3_LORA = {"enabled": True, "rank": 2, "alpha": 2.0, "target_modules": ["attn.to_q", "attn.to_k", "attn.to_v"]}

FAMILIES = {
    "ddim": (build_tiny_sd, lambda m: build_ddim_sampler(m, num_steps=3, eta=1.0), SD_LORA),
    "flow": (build_tiny_sd3, lambda m: build_flowgrpo_sampler(m, num_steps=3, noise_level=0.7), SD3_LORA),
}


def _policy(family: str, lora: bool, folder: Path, seed: int) -> Path:
    """A fine-tune stand-in: the tiny model's trained weights moved at random, saved as a run saves them."""
    build, _, lora_settings = FAMILIES[family]
    model = build(lora=lora_settings if lora else None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_trainable(folder)
    return folder


def _images(family: str, lora: bool, weights_dir: Path | None = None):
    """The model sampled on its own, deterministically: the base, or one policy loaded with load_trainable."""
    build, make_sampler, lora_settings = FAMILIES[family]
    model = build(lora=lora_settings if lora else None)
    if weights_dir is not None:
        model.load_trainable(weights_dir)
    return sample_images(model, make_sampler(model).deterministic(), PROMPTS, SEEDS, batch_size=2)


def _guided(family: str, policies: dict[str, Path], weights: dict[str, float], lora: bool = False) -> tuple:
    """A base model carrying `policies`; with `lora`, built with its own (untrained) adapter, as from a LoRA run's config."""
    build, make_sampler, lora_settings = FAMILIES[family]
    model = build(lora=lora_settings if lora else None)
    loaded = {name: load_policy(model, name, folder) for name, folder in policies.items()}
    return model, make_sampler(model).deterministic(), GuidedModel(model, loaded, weights)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_irg_ends_are_exact(family: str, lora: bool, tmp_path: Path) -> None:
    """w = 0: the base model's images bit for bit; w = 1 for one policy: that policy's, bit for bit."""
    a, b = _policy(family, lora, tmp_path / "a", 1), _policy(family, lora, tmp_path / "b", 2)
    model, sampler, zero = _guided(family, {"a": a, "b": b}, {"a": 0.0, "b": 0.0}, lora)
    base = _images(family, lora=False)
    assert torch.equal(sample_images(model, sampler, PROMPTS, SEEDS, 2, predict=zero.predict), base)
    one = GuidedModel(model, {"a": load_policy(model, "a2", a), "b": load_policy(model, "b2", b)},
                      {"a": 1.0, "b": 0.0})
    alone = _images(family, lora, a)
    assert torch.equal(sample_images(model, sampler, PROMPTS, SEEDS, 2, predict=one.predict), alone)
    assert (alone - base).abs().max() > 1e-3  # the policy really differs from the base


@pytest.mark.parametrize("family", list(FAMILIES))
def test_irg_prediction_is_linear_in_w(family: str, tmp_path: Path) -> None:
    """f(w) = f_base + w (f_a - f_base) for w in {0.5, 1.5, -0.5}, to float32 tolerance."""
    folder = _policy(family, True, tmp_path / "a", 1)
    model, sampler, _ = _guided(family, {}, {})
    policy = load_policy(model, "a", folder)
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    cond, t = model.encode(["a cat", "a dog"]), sampler.timestep(1)
    f_base = GuidedModel(model, {"a": policy}, {"a": 0.0}).predict(x, t, cond)
    f_a = GuidedModel(model, {"a": policy}, {"a": 1.0}).predict(x, t, cond)
    assert (f_a - f_base).abs().max() > 1e-3
    for w in (0.5, 1.5, -0.5):
        mixed = GuidedModel(model, {"a": policy}, {"a": w}).predict(x, t, cond)
        torch.testing.assert_close(mixed, f_base + w * (f_a - f_base), rtol=1e-5, atol=1e-5)


def test_two_policies_mix_each_with_its_own_weight(tmp_path: Path) -> None:
    """With two LoRA adapters on one network, each term uses its own adapter: f = f_b + 0.5(f_1 - f_b) + 2(f_2 - f_b)."""
    folders = {k: _policy("ddim", True, tmp_path / k, seed) for k, seed in (("a", 1), ("b", 2))}
    model, sampler, _ = _guided("ddim", {}, {})
    loaded = {k: load_policy(model, k, f) for k, f in folders.items()}
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    cond, t = model.encode(["a cat", "a dog"]), sampler.timestep(0)
    single = {k: GuidedModel(model, loaded, {"a": float(k == "a"), "b": float(k == "b")}).predict(x, t, cond)
              for k in ("base", "a", "b")}
    mixed = GuidedModel(model, loaded, {"a": 0.5, "b": 2.0}).predict(x, t, cond)
    expected = single["base"] + 0.5 * (single["a"] - single["base"]) + 2.0 * (single["b"] - single["base"])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_deterministic_sampler_has_zero_std_and_ignores_noise() -> None:
    """DDIM's deterministic copy is DDIM at eta 0; the flow one is the Euler ODE step (a = 1, b = d)."""
    model = build_tiny_sd()
    ddim = build_ddim_sampler(model, num_steps=4, eta=1.0)
    assert torch.equal(ddim.deterministic().stds(), torch.zeros(4, dtype=torch.float64))
    eta0 = build_ddim_sampler(model, num_steps=4, eta=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ddim.deterministic().coefficients(2), eta0.coefficients(2)))
    flow = build_flowgrpo_sampler(build_tiny_sd3(), num_steps=4, noise_level=0.7).deterministic()
    a, b, s = flow.coefficients(1)
    assert (float(a), float(b), float(s)) == (1.0, float(flow.sigmas[2] - flow.sigmas[1]), 0.0)
    with pytest.raises(ValueError, match="std 0"):
        flow.log_prob(0, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def test_a_folder_without_weights_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match=r"policy aes: .* holds neither adapter_model.safetensors"):
        load_policy(build_tiny_sd(), "aes", tmp_path)
