"""FLUX adapter: equal to diffusers' FluxPipeline (text encoding, packing, ids, timestep, guidance, schedule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from omegaconf import OmegaConf
from torch import Tensor

from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.models.flux import FluxPolicy, image_ids, load_flux, pack_latents, unpack_latents
from pcpo_hydra.models.tiny_flux import build_tiny_flux, save_tiny_flux
from pcpo_hydra.samplers import build_dancegrpo_sampler, build_flowgrpo_sampler
from pcpo_hydra.weights import ModelLoadError

PROMPTS = ["a cat", "a hedgehog washing the dishes", "Zebra, riding a bike!"]
TIMESTEPS = torch.tensor([1000.0, 613.5, 12.0])  # sigma * 1000, as the samplers give them
# What a FluxPolicy built by hand takes beside its parts (the tiny model's sizes, FLUX.1-dev's guidance).
SIZES = {"resolution": 32, "guidance_scale": 1.0, "guidance": 3.5, "max_sequence_length": 32}


def yaml_lora(option: str) -> dict:
    """The LoRA node of conf/model/<option>.yaml, so its target module names are checked against FLUX."""
    node = OmegaConf.load(Path(config_dir()) / "model" / f"{option}.yaml").lora
    return {**OmegaConf.to_container(node), "enabled": True}


@pytest.fixture(scope="module")
def tiny() -> FluxPolicy:
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), seed=0)


def inputs(model: FluxPolicy) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(len(PROMPTS), *model.latent_shape, generator=g), model.encode_prompts(PROMPTS)


def pipeline(model: FluxPolicy) -> FluxPipeline:
    return FluxPipeline(
        scheduler=model.scheduler, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2, transformer=model.transformer,
    )


def pipeline_velocity(model: FluxPolicy, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor],
                      guidance: float | None) -> Tensor:
    """One denoising call written out as FluxPipeline.__call__ makes it, on unpacked latents."""
    batch, channels, h, w = latents.shape
    out = model.transformer(
        hidden_states=FluxPipeline._pack_latents(latents, batch, channels, h, w),
        timestep=timestep.expand(batch) / 1000,
        guidance=None if guidance is None else torch.full([1], guidance).expand(batch),
        pooled_projections=cond["pooled_prompt_embeds"],
        encoder_hidden_states=cond["prompt_embeds"],
        txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, model.resolution, model.resolution, model.vae_scale_factor)


# ---- build and shapes --------------------------------------------------------------------------


def test_build_is_seeded_and_leaves_the_global_rng_alone(tiny: FluxPolicy) -> None:
    rng = torch.get_rng_state()
    again, other = build_tiny_flux(seed=0), build_tiny_flux(seed=1)
    assert torch.equal(rng, torch.get_rng_state())
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        mine, same, different = (getattr(m, part).state_dict() for m in (tiny, again, other))
        assert all(torch.equal(mine[k], same[k]) for k in mine)
        assert not all(torch.equal(mine[k], different[k]) for k in mine)


def test_tiny_carries_flux_numbers(tiny: FluxPolicy) -> None:
    assert tiny.latent_shape == (4, 16, 16)
    assert (tiny.vae.config.scaling_factor, tiny.vae.config.shift_factor) == (0.3611, 0.1159)
    assert tiny.transformer.config.guidance_embeds and tiny.guidance == 3.5 and tiny.guidance_scale == 1.0
    x, cond = inputs(tiny)
    assert cond["prompt_embeds"].shape == (3, 32, 32) and cond["pooled_prompt_embeds"].shape == (3, 32)
    images = tiny.decode(3 * x)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1 and images.std() > 0.01


def test_bad_resolution_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"model\.resolution=30 must be a multiple of 4"):
        build_tiny_flux(resolution=30)


# ---- equality with FluxPipeline ------------------------------------------------------------------


def test_encode_prompts_equals_the_pipeline(tiny: FluxPolicy) -> None:
    embeds, pooled, text_ids = pipeline(tiny).encode_prompt(PROMPTS, device="cpu", max_sequence_length=32)
    ours = tiny.encode_prompts(PROMPTS)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert not torch.equal(ours["prompt_embeds"][0], ours["prompt_embeds"][1])
    assert torch.equal(text_ids, torch.zeros(32, 3))  # what forward_network builds itself


def test_packing_and_ids_equal_the_pipeline() -> None:
    latents = torch.randn(2, 3, 6, 10)  # not square: rows and columns must not swap
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 3, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(3, 5, torch.device("cpu"), torch.float32), expected_ids)
    assert image_ids(3, 5, torch.device("cpu"), torch.float32)[6].tolist() == [0, 1, 1]  # row-major


@pytest.mark.parametrize("timestep", [TIMESTEPS, torch.tensor(613.5)], ids=["per-row", "scalar"])
def test_forward_network_is_the_pipelines_transformer_call(tiny: FluxPolicy, timestep: Tensor) -> None:
    x, cond = inputs(tiny)
    ours = tiny.forward_network(tiny.network, x, timestep, cond)
    assert torch.equal(ours, pipeline_velocity(tiny, x, timestep, cond, guidance=3.5))
    assert not torch.allclose(ours, pipeline_velocity(tiny, x, timestep, cond, guidance=1.0))


def test_transformer_without_guidance_embedding_gets_none(tiny: FluxPolicy) -> None:
    config = {**tiny.transformer.config, "guidance_embeds": False}
    with torch.random.fork_rng(devices=[]):
        transformer = FluxTransformer2DModel.from_config(config)
    model = FluxPolicy(
        transformer, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.text_encoder_2, tiny.tokenizer_2,
        tiny.scheduler, resolution=32, guidance_scale=1.0, guidance=3.5, max_sequence_length=32,
    )
    x, cond = inputs(model)
    expected = pipeline_velocity(model, x, TIMESTEPS, cond, guidance=None)
    assert torch.equal(model.forward_network(model.network, x, TIMESTEPS, cond), expected)


def test_true_cfg_combines_unconditional_and_conditional(tiny: FluxPolicy) -> None:
    x, cond = inputs(tiny)
    f_c = tiny.forward_network(tiny.network, x, TIMESTEPS, cond)
    f_u = tiny.forward_network(tiny.network, x, TIMESTEPS, tiny.encode_prompts([""] * 3))
    assert torch.equal(tiny.predict(x, TIMESTEPS, cond), f_c)  # guidance_scale 1.0: one conditional call
    guided = build_tiny_flux(seed=0, guidance_scale=4.0)
    torch.testing.assert_close(guided.predict(x, TIMESTEPS, cond), f_u + 4.0 * (f_c - f_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resolution", [32, 48])
@pytest.mark.parametrize("num_steps", [10, 28])
def test_flow_sigmas_are_the_pipelines_schedule(num_steps: int, resolution: int) -> None:
    model = build_tiny_flux(resolution=resolution)
    pipe, config = pipeline(model), model.scheduler.config
    packed, _ = pipe.prepare_latents(1, 4, resolution, resolution, torch.float32, "cpu", None)
    mu = calculate_shift(packed.shape[1], config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    assert reference.sigmas[-1] == 0
    torch.testing.assert_close(model.flow_sigmas(num_steps), reference.sigmas.double(), rtol=0, atol=1e-6)


def test_sampler_builders_take_the_models_schedule(tiny: FluxPolicy) -> None:
    assert torch.equal(build_flowgrpo_sampler(tiny, 10, 0.7).sigmas, tiny.flow_sigmas(10))
    assert torch.equal(build_dancegrpo_sampler(tiny, 12, 0.3).sigmas, tiny.flow_sigmas(12))


# ---- trainable weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["tiny_flux", "flux"])
def test_lora_of_the_yaml_starts_at_the_base_and_reference_stays_there(tiny: FluxPolicy, option: str) -> None:
    adapted = build_tiny_flux(seed=0, lora=yaml_lora(option))
    adapted.keep_reference()
    trained = [(n, p) for n, p in adapted.transformer.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    assert {id(p) for _, p in trained} == {id(p) for p in adapted.trainable_parameters()}
    x, cond = inputs(tiny)
    base = tiny.predict(x, TIMESTEPS, cond)
    assert torch.equal(adapted.predict(x, TIMESTEPS, cond), base)
    with torch.no_grad():
        for _, p in trained:
            p.add_(0.1)
    assert not torch.allclose(adapted.predict(x, TIMESTEPS, cond), base)
    assert torch.equal(adapted.predict_reference(x, TIMESTEPS, cond), base)


def test_full_fine_tune_trains_the_transformer_only(tiny: FluxPolicy) -> None:
    assert {id(p) for p in tiny.trainable_parameters()} == {id(p) for p in tiny.transformer.parameters()}
    frozen = (tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


def test_low_precision_keeps_lora_float32_and_stays_close() -> None:
    model = build_tiny_flux(seed=0, lora=yaml_lora("tiny_flux"))
    x, cond = inputs(model)
    full = model.predict(x, TIMESTEPS, cond)
    model.to("cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16 and {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    low = model.predict(x, TIMESTEPS, model.encode_prompts(PROMPTS))
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().mean() < 0.05 * full.abs().mean()  # bf16 rounding only (measured ~3%)


def test_gradient_checkpointing_reaches_the_transformer(tiny: FluxPolicy) -> None:
    parts = (tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.text_encoder_2, tiny.tokenizer_2, tiny.scheduler)
    with torch.random.fork_rng(devices=[]):
        transformer = FluxTransformer2DModel.from_config(tiny.transformer.config)
    FluxPolicy(transformer, *parts, **SIZES, gradient_checkpointing=True)
    assert transformer.gradient_checkpointing


# ---- pipeline folders and load errors ----------------------------------------------------------------


def test_saved_pipeline_loads_back_identically(tiny: FluxPolicy, saved: Path) -> None:
    loaded = load_flux(str(saved), resolution=32, max_sequence_length=32)
    x, cond = inputs(tiny)
    for key, value in loaded.encode_prompts(PROMPTS).items():
        assert torch.equal(value, cond[key])
    assert torch.equal(loaded.predict(x, TIMESTEPS, cond), tiny.predict(x, TIMESTEPS, cond))
    assert torch.equal(loaded.decode(x), tiny.decode(x))
    assert torch.equal(loaded.flow_sigmas(10), tiny.flow_sigmas(10))
    assert type(FluxPipeline.from_pretrained(str(saved)).scheduler) is FlowMatchEulerDiscreteScheduler


def test_save_pretrained_refuses_lora(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="save_trainable"):
        build_tiny_flux(lora=yaml_lora("tiny_flux")).save_pretrained(tmp_path)


def test_missing_local_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_flux"
    with pytest.raises(ModelLoadError, match="no such local directory") as caught:
        load_flux(str(missing), resolution=32)
    assert str(missing) in str(caught.value) and "model.pretrained=" in str(caught.value)
    assert "text_encoder_2/" in str(caught.value)  # the FLUX layout, not SD's


def test_unreproduced_scheduler_is_refused(tiny: FluxPolicy) -> None:
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    parts = (tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.text_encoder_2, tiny.tokenizer_2, static)
    with pytest.raises(ValueError, match=r"\{'use_dynamic_shifting': False\}"):
        FluxPolicy(tiny.transformer, *parts, **SIZES)


def test_t5_length_beyond_flux_training_is_refused(tiny: FluxPolicy) -> None:
    parts = (tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.text_encoder_2, tiny.tokenizer_2, tiny.scheduler)
    with pytest.raises(ValueError, match=r"model\.max_sequence_length must be in 1\.\.512, got 513"):
        FluxPolicy(tiny.transformer, *parts, **{**SIZES, "max_sequence_length": 513})
