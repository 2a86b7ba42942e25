"""A tiny FLUX.1 built in code: FLUX's own classes at toy sizes, seeded weights, no download.

One double-stream and one single-stream block of width 32 over 64 image tokens (16x16 latents of
a 32 px image, in 2x2 patches) and 32 T5 tokens; the text parts and the factor-2 VAE are shared
with the other tiny models. The VAE, guidance embedding and scheduler carry FLUX.1-dev's numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel

from pcpo_hydra.models.flux import PATCH, FluxPolicy
from pcpo_hydra.models.tiny import (
    LATENT_CHANNELS, MAX_TOKENS, TEXT_WIDTH, tiny_clip_text_config, tiny_t5_encoder, tiny_t5_tokenizer,
    tiny_tokenizer, tiny_vae,
)

# FLUX.1-dev's scheduler_config.json: the shift grows with the image's token count.
FLUX_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's latent normalisation
HEAD_DIM = 16
ROPE_AXES = (4, 6, 6)  # (text/index, row, col) rotary dims, as FLUX's (16, 56, 56) splits its 128


def tiny_flux_transformer() -> FluxTransformer2DModel:
    """Two heads of 16, one block of each kind; text and pooled widths those of the tiny T5 and CLIP."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=PATCH**2 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=HEAD_DIM, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True, axes_dims_rope=ROPE_AXES,
    )


def build_tiny_flux(
    seed: int = 0,
    resolution: int = 32,
    guidance_scale: float = 1.0,
    guidance: float = 3.5,
    lora: Mapping[str, Any] | None = None,
    offload_text_encoders: bool = False,
) -> FluxPolicy:
    """Hydra target of conf/model/tiny_flux.yaml: same seed, same weights (LoRA init included).

    Latents are 4 x resolution/2 x resolution/2; T5 pads to 32 tokens. The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer(MAX_TOKENS)
        return FluxPolicy(
            tiny_flux_transformer(), tiny_vae(resolution, **FLUX_VAE),
            CLIPTextModel(tiny_clip_text_config(tokenizer)), tokenizer,
            tiny_t5_encoder(tokenizer_2), tokenizer_2, FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
            resolution=resolution, guidance_scale=guidance_scale, guidance=guidance,
            max_sequence_length=MAX_TOKENS, lora=lora, offload_text_encoders=offload_text_encoders,
        )


def save_tiny_flux(directory: Path | str, seed: int = 0, resolution: int = 32) -> Path:
    """Write the tiny model as a FLUX pipeline folder; `model=flux model.pretrained=<folder>` then loads it."""
    return build_tiny_flux(seed, resolution).save_pretrained(directory)
