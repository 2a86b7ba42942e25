"""SD3 / SD3.5 adapter on the tiny build: equal to diffusers' StableDiffusion3Pipeline where it overlaps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from hydra.utils import instantiate
from torch import Tensor, nn

from pcpo_hydra.config import validate
from pcpo_hydra.models.sd3 import SD3Policy, load_sd3
from pcpo_hydra.models.tiny_sd3 import build_tiny_sd3, save_tiny_sd3
from pcpo_hydra.samplers import build_flowgrpo_sampler
from pcpo_hydra.weights import ModelLoadError

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
LORA = {"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": TARGETS}
PROMPTS = ["a cat", "a hedgehog washing the dishes", "Zebra, riding a bike!"]
TOKENS = 32  # the tiny model's CLIP and T5 lengths


@pytest.fixture(scope="module")
def tiny() -> SD3Policy:
    return build_tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


def inputs(model: SD3Policy, n: int = 3) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *model.latent_shape, generator=g), model.encode_prompts(PROMPTS[:n])


def pipeline(model: SD3Policy) -> StableDiffusion3Pipeline:
    """diffusers' own pipeline around the very modules of `model`."""
    (tokenizer, tokenizer_2, tokenizer_3), scheduler = model.tokenizers, model.scheduler
    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
        vae=model.vae, text_encoder=model.clip_l, tokenizer=tokenizer, text_encoder_2=model.clip_g,
        tokenizer_2=tokenizer_2, text_encoder_3=model.t5, tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class CountingNetwork(nn.Module):
    """Stands in for an accelerator-wrapped network: forwards and records each call's batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, **kwargs: Tensor):
        self.batches.append(kwargs["hidden_states"].shape[0])
        return self.inner(**kwargs)


# ---- tiny build ------------------------------------------------------------------------------


def test_same_seed_same_weights_and_global_rng_untouched(tiny: SD3Policy) -> None:
    rng = torch.get_rng_state()
    again, other = build_tiny_sd3(seed=0), build_tiny_sd3(seed=1)
    assert torch.equal(rng, torch.get_rng_state())
    for part in ("transformer", "vae", "clip_l", "clip_g", "t5"):
        assert same_weights(getattr(tiny, part), getattr(again, part))
        assert not same_weights(getattr(tiny, part), getattr(other, part))


def test_shapes_layout_and_ranges(tiny: SD3Policy) -> None:
    x, cond = inputs(tiny)
    assert tiny.latent_shape == (16, 16, 16)  # SD3's 16 channels, 32 px / VAE factor 2
    # 32 CLIP tokens (L 16 + G 32 wide, zero-padded to T5's 64), then 32 T5 tokens; pooled = 16 + 32
    assert cond["prompt_embeds"].shape == (3, 2 * TOKENS, 64) and cond["pooled_prompt_embeds"].shape == (3, 48)
    assert not cond["prompt_embeds"][:, :TOKENS, 48:].any() and cond["prompt_embeds"][:, TOKENS:, 48:].any()
    for timestep in (torch.tensor(1000.0), torch.tensor([1000.0, 500.0, 8.9])):
        assert tiny.predict(x, timestep, cond).shape == x.shape
    images = tiny.decode(3 * x)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01


# ---- equal to diffusers' pipeline ------------------------------------------------------------


def test_encode_prompts_equals_pipeline_encode_prompt(tiny: SD3Policy) -> None:
    embeds, negative, pooled, negative_pooled = pipeline(tiny).encode_prompt(
        PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
        max_sequence_length=TOKENS,
    )
    ours, empty = tiny.encode_prompts(PROMPTS), tiny.encode_prompts([""] * len(PROMPTS))
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    # The pipeline's unconditional row is the empty prompt encoded the same way, as base CFG uses.
    assert torch.equal(empty["prompt_embeds"], negative) and torch.equal(empty["pooled_prompt_embeds"], negative_pooled)


def test_forward_network_is_the_pipelines_transformer_call(tiny: SD3Policy) -> None:
    x, cond = inputs(tiny)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny.scheduler.config)
    scheduler.set_timesteps(10)
    sampler = build_flowgrpo_sampler(tiny, 10, 0.7)
    t = scheduler.timesteps[3]
    torch.testing.assert_close(sampler.timestep(3), t)  # what the loop passes: sigma * 1000, as the pipeline
    expected = tiny.transformer(
        hidden_states=x, timestep=t.expand(3), encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_prompt_embeds"], return_dict=False,
    )[0]
    assert torch.equal(tiny.forward_network(tiny.network, x, t, cond), expected)
    # Per-sample timesteps: row k is the call at its own timestep.
    ts = scheduler.timesteps[[0, 5, 9]]
    rows = tiny.forward_network(tiny.network, x, ts, cond)
    for k in range(3):
        single = tiny.forward_network(tiny.network, x[k : k + 1], ts[k], {n: v[k : k + 1] for n, v in cond.items()})
        torch.testing.assert_close(rows[k : k + 1], single, rtol=1e-5, atol=1e-5)


def test_guided_euler_sampling_equals_the_pipeline(tiny: SD3Policy) -> None:
    """Encoding, guidance, timestep units and schedule together: 3 deterministic Euler steps."""
    x, cond = inputs(tiny)
    expected = pipeline(tiny)(
        prompt=PROMPTS, height=32, width=32, num_inference_steps=3, guidance_scale=tiny.guidance_scale,
        latents=x.clone(), output_type="latent", max_sequence_length=TOKENS,
    ).images
    sigmas = tiny.flow_sigmas(3).float()
    with torch.no_grad():
        for i in range(3):
            x = x + (sigmas[i + 1] - sigmas[i]) * tiny.predict(x, sigmas[i] * 1000, cond)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_guidance_is_one_batched_call_combining_uncond_and_cond(tiny: SD3Policy) -> None:
    model = build_tiny_sd3(seed=0, guidance_scale=4.5)
    x, cond = inputs(model)
    t = torch.tensor([1000.0, 500.0, 8.9])
    f_u = model.forward_network(model.network, x, t, model.encode_prompts([""] * 3))
    f_c = model.forward_network(model.network, x, t, cond)
    model.network = CountingNetwork(model.transformer)
    f = model.predict(x, t, cond)
    assert model.network.batches == [6]
    torch.testing.assert_close(f, f_u + 4.5 * (f_c - f_u), rtol=1e-5, atol=1e-5)


def test_guidance_one_is_a_single_conditional_call() -> None:
    model = build_tiny_sd3(seed=0, guidance_scale=1.0)
    x, cond = inputs(model)
    expected = model.forward_network(model.network, x, torch.tensor(500.0), cond)
    model.network = CountingNetwork(model.transformer)
    assert torch.equal(model.predict(x, torch.tensor(500.0), cond), expected)
    assert model.network.batches == [3]


@pytest.mark.parametrize("num_steps", [10, 40])
def test_flow_sigmas_are_the_pipelines_schedule(tiny: SD3Policy, num_steps: int) -> None:
    for scheduler in (FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5-Medium's scheduler config
                      FlowMatchEulerDiscreteScheduler.from_config(tiny.scheduler.config)):
        scheduler.set_timesteps(num_steps)
        ours = tiny.flow_sigmas(num_steps)
        assert ours.shape == (num_steps + 1,) and ours[0] == 1 and ours[-1] == 0
        torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=0, atol=1e-6)
    assert torch.equal(build_flowgrpo_sampler(tiny, num_steps, 0.7).sigmas, tiny.flow_sigmas(num_steps))


def test_scheduler_with_another_schedule_is_refused(tiny: SD3Policy) -> None:
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        SD3Policy(tiny.transformer, tiny.vae, tuple(tiny.text_encoders()), tiny.tokenizers, dynamic,
                  guidance_scale=4.5, max_sequence_length=TOKENS)


# ---- trainable weights -----------------------------------------------------------------------


def test_full_fine_tune_trains_the_whole_transformer_only(tiny: SD3Policy) -> None:
    assert {id(p) for p in tiny.trainable_parameters()} == {id(p) for p in tiny.transformer.parameters()}
    assert not any(p.requires_grad for m in (tiny.vae, *tiny.text_encoders()) for p in m.parameters())


def test_lora_covers_every_target_starts_at_the_base_and_reference_stays_there(tiny: SD3Policy) -> None:
    model = build_tiny_sd3(seed=0, lora=LORA)
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(model.trainable_parameters()) == len(names)
    assert all(any(f".{target}.lora_A" in n for n in names) for target in TARGETS)
    x, cond = inputs(model)
    t = torch.tensor(500.0)
    base = tiny.predict(x, t, cond)
    assert torch.equal(model.predict(x, t, cond), base)
    model.keep_reference()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(model.predict(x, t, cond), base)
    assert torch.equal(model.predict_reference(x, t, cond), base)


def test_gradients_reach_the_trainable_weights() -> None:
    model = build_tiny_sd3(seed=0, lora=LORA)
    x, cond = inputs(model)
    model.predict(x, torch.tensor([1000.0, 500.0, 8.9]), cond).square().mean().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_low_precision_placement_keeps_trained_weights_float32() -> None:
    model = build_tiny_sd3(seed=0, lora=LORA).to("cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    frozen = (model.vae, *model.text_encoders(), model.transformer.pos_embed)
    assert {next(m.parameters()).dtype for m in frozen} == {torch.bfloat16}
    x, cond = inputs(model)
    assert model.predict(x, torch.tensor(500.0), cond).isfinite().all()


# ---- pipeline folders, config and errors -------------------------------------------------------


def test_saved_pipeline_loads_back_identically(tiny: SD3Policy, saved: Path) -> None:
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    loaded = load_sd3(str(saved), guidance_scale=4.5, max_sequence_length=TOKENS)
    assert loaded.latent_shape == tiny.latent_shape  # resolution from the saved transformer's sample_size
    x, cond = inputs(tiny)
    loaded_cond = loaded.encode_prompts(PROMPTS)
    assert all(torch.equal(loaded_cond[k], cond[k]) for k in cond)
    assert torch.equal(loaded.predict(x, torch.tensor(500.0), cond), tiny.predict(x, torch.tensor(500.0), cond))
    assert torch.equal(loaded.decode(x), tiny.decode(x))
    assert torch.equal(loaded.flow_sigmas(10), tiny.flow_sigmas(10))


def test_config_nodes_build_the_model(compose_cfg, saved: Path) -> None:
    """conf/model/{tiny_sd3,sd35_medium}.yaml pass validation and their keys are the builders' arguments."""
    tiny = instantiate(validate(compose_cfg("model=tiny_sd3")).model)
    assert isinstance(tiny, SD3Policy) and tiny.guidance_scale == 4.5 and tiny.latent_shape == (16, 16, 16)
    cfg = validate(compose_cfg("model=sd35_medium", f"model.pretrained={saved}", "model.resolution=32"))
    loaded = instantiate(cfg.model)
    assert loaded.max_sequence_length == 256 and loaded.resolution == 32
    assert all(f".{target}.lora_A" in "".join(n for n, _ in loaded.transformer.named_parameters())
               for target in TARGETS)


def test_save_pretrained_refuses_lora(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="save_trainable"):
        build_tiny_sd3(lora=LORA).save_pretrained(tmp_path)


def test_missing_local_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(ModelLoadError, match="no such local directory") as caught:
        load_sd3(str(missing), max_sequence_length=TOKENS)
    assert str(missing) in str(caught.value) and "model.pretrained=" in str(caught.value)


def test_missing_component_is_named(saved: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(saved, tmp_path / "copy")
    shutil.rmtree(copy / "text_encoder_3")
    with pytest.raises(ModelLoadError, match=r"the text_encoder_3 of model .* no text_encoder_3/ subfolder.*"
                                             r"model\.pretrained=.*transformer/"):
        load_sd3(str(copy), max_sequence_length=TOKENS)


def test_bad_resolution_is_named(saved: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.resolution=30 must be a positive multiple of 4"):
        build_tiny_sd3(resolution=30)  # not whole 2x2 patches of the factor-2 latent
    with pytest.raises(ValueError, match=r"model\.resolution=36 .* at most 32"):
        load_sd3(str(saved), resolution=36, max_sequence_length=TOKENS)  # more patches per side than the position table holds
