"""A tiny Stable Diffusion built in code: the real classes at toy sizes, seeded weights, no download.

The tiny text parts (a character-level CLIP BPE and T5 unigram tokenizer, one-layer encoders) are
shared with the tiny flow models (tiny_sd3, tiny_flux).

It makes `pcpo-train` with no overrides a complete run on a laptop CPU in minutes. Sizes are set
so the UNet dominates the cost, as it does at full scale: with CFG, 20 UNet calls on 2x32 latents
of 4x16x16 take ~100x one VAE decode plus one text encoding of the same 32 samples.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast,
)

from pcpo_hydra.models.stable_diffusion import StableDiffusionPolicy

MAX_TOKENS = 32        # tokenizer length = text encoder positions; one token per character
TEXT_WIDTH = 32        # text hidden size = UNet cross-attention width
LATENT_CHANNELS = 4
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = string.ascii_lowercase + string.digits + string.punctuation

# SD 1.x's training noise schedule, so samplers and credit weights see the real numbers.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
}


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE (no merges): every lowercase ASCII prompt tokenizes; others map to EOS.

    Each printable character has a word-inner and a word-final ("</w>") token, as CLIP's BPE expects.
    """
    tokens = [*CHARS, *(c + "</w>" for c in CHARS), BOS, EOS]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def tiny_t5_tokenizer(max_length: int = MAX_TOKENS) -> T5TokenizerFast:
    """A character-level T5 unigram tokenizer (word-initial pieces carry T5's "\u2581"), ending in </s>.

    Built from a `tokenizers` model, so it needs no sentencepiece and saves as tokenizer.json.
    """
    space = "\u2581"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (space, -3.0)]
    pieces += [(c, -2.0) for c in CHARS] + [(space + c, -1.0) for c in CHARS]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=max_length,
    )


def tiny_t5_encoder(tokenizer: T5TokenizerFast, width: int = TEXT_WIDTH) -> T5EncoderModel:
    """One T5 encoder layer of `width` over the tiny tokenizer's vocabulary."""
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=1,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def tiny_clip_text_config(tokenizer: CLIPTokenizer, width: int = TEXT_WIDTH) -> CLIPTextConfig:
    """One CLIP text layer of `width` over the tiny tokenizer (build CLIPTextModel or ...WithProjection)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(resolution: int, **config: Any) -> AutoencoderKL:
    """Downsamples by 2 only, 4 channels, no 1x1 (post-)quant convs: decoding stays < 1% of sampling.

    At 64x64 images (factor 4) the full-size decoder layers alone cost ~2% of a rollout's UNet calls.
    `config` overrides any AutoencoderKL argument (the flow models set SD3/FLUX's scaling and shift).
    """
    return AutoencoderKL(**{
        "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS, "block_out_channels": (4, 4),
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 0, "norm_num_groups": 2, "sample_size": resolution,
        "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False, **config,
    })


def _unet(resolution: int) -> UNet2DConditionModel:
    """Two resolution levels; text enters through cross-attention in the mid block only (8x8 tokens).

    Attention over the 16x16 level would be several times the cost of everything else here.
    """
    return UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4,
    )


def build_tiny_sd(
    seed: int = 0,
    resolution: int = 32,
    guidance_scale: float = 5.0,
    lora: Mapping[str, Any] | None = None,
    offload_text_encoders: bool = False,
    timestep_spacing: str = "leading",
) -> StableDiffusionPolicy:
    """Hydra target of conf/model/tiny_sd.yaml: same seed, same weights (LoRA init included).

    Latents are 4 x resolution/2 x resolution/2. The global RNG is left as it was.
    `timestep_spacing` is diffusers' DDIM option: "leading" (SD 1.x, DDPO) or "trailing" (sd-turbo,
    whose few steps must start at t = 999); it changes only which timesteps a sampler visits.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        return StableDiffusionPolicy(
            _unet(resolution), tiny_vae(resolution), CLIPTextModel(tiny_clip_text_config(tokenizer)), tokenizer,
            DDIMScheduler(**SD_SCHEDULE, timestep_spacing=timestep_spacing), resolution=resolution,
            guidance_scale=guidance_scale, lora=lora, offload_text_encoders=offload_text_encoders,
        )


def build_tiny_sd_turbo(*, guidance_scale: float = 1.0, **options: Any) -> StableDiffusionPolicy:
    """Hydra target of conf/model/tiny_sd_turbo.yaml: the tiny SD (random weights, as `build_tiny_sd`'s
    `options` make them) on sd-turbo's trailing DDIM timesteps, sampled without guidance by default.

    A stand-in for tests and CPU runs of sd-turbo's schedule and one-call-per-step sampling, not of
    its few-step skill. A target of its own because its guidance default (1.0) differs from the tiny
    SD's (5.0), and every target's Python defaults must be what its conf option says (tests/test_defaults.py).
    """
    return build_tiny_sd(guidance_scale=guidance_scale, timestep_spacing="trailing", **options)


def save_tiny_sd(directory: Path | str, seed: int = 0, resolution: int = 32, timestep_spacing: str = "leading") -> Path:
    """Write the tiny model as a diffusers pipeline folder; `model.pretrained=<folder>` then loads it
    (`timestep_spacing="trailing"`: a folder that loads like sd-turbo's)."""
    return build_tiny_sd(seed, resolution, timestep_spacing=timestep_spacing).save_pretrained(directory)
