"""model=sd_turbo and model=tiny_sd_turbo: an SD-2.1-shaped pipeline through the SD loader, sd-turbo's
trailing DDIM timesteps, unguided steps, and what pcpo-train does with each option before training."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import CLIPTextModel

from pcpo_hydra.config import validate
from pcpo_hydra.models.stable_diffusion import StableDiffusionPolicy, load_stable_diffusion
from pcpo_hydra.models.tiny import (
    LATENT_CHANNELS, TEXT_WIDTH, build_tiny_sd, save_tiny_sd, tiny_clip_text_config, tiny_tokenizer, tiny_vae,
)
from pcpo_hydra.samplers.ddim import DDIMSampler
from pcpo_hydra.weights import ModelLoadError

from test_models import PROMPTS, CountingNetwork, same_weights
from test_training import pcpo_train

# The keys of sd-turbo's scheduler_config.json (an EulerDiscreteScheduler) that DDIM reads.
SD_TURBO_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False,
    "clip_sample": False,
}
# Trailing spacing: every schedule starts at the last training timestep, whatever the step count.
TRAILING = {1: [999], 4: [999, 749, 499, 249], 10: list(range(999, 0, -100)), 50: list(range(999, 0, -20))}
RESOLUTION = 16  # the tiny VAE halves it: latents 4 x 8 x 8, the UNet's sample_size


def sd21_shaped_pipeline() -> StableDiffusionPipeline:
    """SD 2.1's architecture at toy size, from the real classes: a gelu CLIP text model of several layers
    (how diffusers holds OpenCLIP-H), a UNet with linear attention projections, per-block head counts and
    cross-attention at two levels, and sd-turbo's Euler scheduler config."""
    tokenizer = tiny_tokenizer()
    text = tiny_clip_text_config(tokenizer)
    text.hidden_act, text.num_hidden_layers = "gelu", 2
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=[2, 4], use_linear_projection=True,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(RESOLUTION), text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SD_TURBO_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The SD-2.1-shaped pipeline's folder, and its UNet's weights as saved."""
    folder = tmp_path_factory.mktemp("sd21_shaped")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline = sd21_shaped_pipeline()
    pipeline.save_pretrained(folder)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    return folder, {k: v.clone() for k, v in pipeline.unet.state_dict().items()}


@pytest.fixture
def turbo(compose_cfg, saved: tuple[Path, dict[str, torch.Tensor]]) -> StableDiffusionPolicy:
    """The saved folder loaded as conf/model/sd_turbo.yaml says (Hydra-composed, validated, instantiated)."""
    cfg = compose_cfg("model=sd_turbo", f"model.pretrained={saved[0]}", f"model.resolution={RESOLUTION}")
    return instantiate(validate(cfg).model)


def timesteps(sampler: DDIMSampler) -> list[int]:
    return [int(sampler.timestep(i)) for i in range(sampler.num_steps)]


# ---- model=sd_turbo on an SD-2.1-shaped pipeline --------------------------------------------------


def test_the_scheduler_is_ddim_on_sd_turbos_trailing_config(turbo: StableDiffusionPolicy) -> None:
    config = turbo.scheduler.config
    assert type(turbo.scheduler) is DDIMScheduler and config.timestep_spacing == "trailing"
    assert (config.prediction_type, config.set_alpha_to_one, config.clip_sample) == ("epsilon", False, False)
    for steps in (1, 4, 50):
        assert timesteps(DDIMSampler(turbo.scheduler, steps, eta=1.0)) == TRAILING[steps]
    # The last step ends at alphas_cumprod[0], not 1 (set_alpha_to_one false): its std bound is sqrt(1 - 0.99915).
    assert DDIMSampler(turbo.scheduler, 1).std_bounds(0)[1] == pytest.approx((1 - 0.99915) ** 0.5, rel=1e-3)


def test_the_unet_is_the_saved_one_with_lora_on_the_attention_projections(
    turbo: StableDiffusionPolicy, saved: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    base = {k.replace(".base_layer", ""): v for k, v in turbo.unet.state_dict().items() if "lora_" not in k}
    assert base.keys() == saved[1].keys() and all(torch.equal(base[k], v) for k, v in saved[1].items())
    adapted = {re.sub(r"^.*\.attn\d\.", "", name)
               for name, module in turbo.unet.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"to_q", "to_k", "to_v", "to_out.0"}
    assert turbo.guidance_scale == 1.0 and turbo.latent_shape == (LATENT_CHANNELS, 8, 8)


def test_prompts_are_encoded_as_diffusers_encodes_them(turbo: StableDiffusionPolicy, saved) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(saved[0], safety_checker=None, requires_safety_checker=False)
    expected, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert torch.equal(turbo.encode_prompts(PROMPTS)["prompt_embeds"], expected)


def test_an_unguided_step_is_one_unet_call_on_the_batch(turbo: StableDiffusionPolicy) -> None:
    sampler = DDIMSampler(turbo.scheduler, 1, eta=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(PROMPTS), *turbo.latent_shape, generator=g)
    turbo.network = CountingNetwork(turbo.unet)
    f = turbo.predict(x, sampler.timestep(0), turbo.encode_prompts(PROMPTS))
    prev, _, std = sampler.step(0, x, f, torch.randn(x.shape, generator=g))
    assert turbo.network.batches == [len(PROMPTS)]  # not 2 x the batch, as a guided step would be
    assert prev.shape == x.shape and prev.isfinite().all() and float(std) > 0


def test_v_prediction_checkpoints_are_refused_by_name(saved, tmp_path: Path) -> None:
    copy = shutil.copytree(saved[0], tmp_path / "v")
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ModelLoadError, match=r"the scheduler of model .* predicts 'v_prediction'.* Fix: use an "
                                             r"epsilon-prediction checkpoint"):
        load_stable_diffusion(str(copy), guidance_scale=1.0)


@pytest.mark.parametrize("algorithm", ["pcpo", "sdpo"])
def test_sd_turbo_offline_without_a_copy_stops_at_once_naming_the_weights(tmp_path: Path, algorithm: str) -> None:
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = pcpo_train(tmp_path / "mlflow.db", f"algorithm={algorithm}", "model=sd_turbo",
                        f"hydra.run.dir={tmp_path / 'run'}", returncode=1, env=offline)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pcpo-train:")]
    assert len(errors) == 1
    assert errors[0].startswith("pcpo-train: Cannot load the scheduler of model 'stabilityai/sd-turbo'")
    assert "HF_HUB_OFFLINE is set" in errors[0] and "model.pretrained=<local path>" in errors[0]
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr + result.stdout
    assert not (tmp_path / "mlflow.db").exists()


# ---- model=tiny_sd_turbo ------------------------------------------------------------------------


def test_tiny_sd_turbo_is_the_tiny_sd_on_trailing_timesteps_unguided(compose_cfg) -> None:
    cfg = validate(compose_cfg("model=tiny_sd_turbo"))
    model = instantiate(cfg.model)
    assert model.guidance_scale == 1.0 and model.scheduler.config.timestep_spacing == "trailing"
    assert cfg.sampler.num_steps == 10 and timesteps(DDIMSampler(model.scheduler, 10)) == TRAILING[10]
    tiny = build_tiny_sd(seed=cfg.seed)
    assert all(same_weights(getattr(model, part), getattr(tiny, part)) for part in ("unet", "vae", "text_encoder"))
    assert (cfg.epochs, cfg.optim.lr) == (60, 1e-3)  # tiny_sd's CPU recipe came with it


def test_a_saved_trailing_tiny_sd_loads_as_sd_turbo_does(tmp_path: Path) -> None:
    save_tiny_sd(tmp_path, timestep_spacing="trailing")
    loaded = load_stable_diffusion(str(tmp_path), guidance_scale=1.0)
    assert timesteps(DDIMSampler(loaded.scheduler, 4)) == TRAILING[4]


def test_pcpo_train_composes_tiny_sd_turbo(tmp_path: Path) -> None:
    result = pcpo_train(tmp_path / "mlflow.db", "model=tiny_sd_turbo", "epochs=1", "--cfg", "job")
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model._target_ == "pcpo_hydra.models.tiny.build_tiny_sd_turbo" and cfg.model.guidance_scale == 1.0
    assert cfg.epochs == 1 and not (tmp_path / "mlflow.db").exists()  # composed and printed, nothing run
