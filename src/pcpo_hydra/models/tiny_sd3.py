"""A tiny SD3.5 built in code: the real SD3 classes at toy sizes, seeded weights, no download.

Kept in SD3.5-Medium's shape where it costs little: two CLIP encoders of different widths (as L and
G differ) whose side-by-side states T5's wider ones pad, a 16-channel VAE with SD3's scaling and
shift, and an MMDiT with RMS q/k norms and one dual-attention block (MMDiT-X) ahead of a final
context-pre-only block, so every LoRA target of conf/model/sd35_medium.yaml exists. It is sized so
that a guided prediction costs no more than the tiny SD UNet's, keeping its CPU runs as short.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection

from pcpo_hydra.models.sd3 import SD3Policy
from pcpo_hydra.models.tiny import (
    MAX_TOKENS, tiny_clip_text_config, tiny_t5_encoder, tiny_t5_tokenizer, tiny_tokenizer, tiny_vae,
)

CLIP_L_WIDTH, CLIP_G_WIDTH = 16, 32   # also their projection widths: pooled = 48
T5_WIDTH = 64                         # >= CLIP_L + CLIP_G, which the pipeline zero-pads up to it
LATENT_CHANNELS = 16
SD3_VAE = {"latent_channels": LATENT_CHANNELS, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3.5-Medium's scheduler config
PATCH = 2


def _clip(width: int) -> CLIPTextModelWithProjection:
    """Two layers, so the penultimate state SD3 reads has passed through one."""
    config = tiny_clip_text_config(tiny_tokenizer(), width)
    config.num_hidden_layers = 2
    return CLIPTextModelWithProjection(config)


def _transformer(resolution: int) -> SD3Transformer2DModel:
    """2 blocks of 4 heads x 8; latents resolution/2 per side in 2x2 patches (64 image tokens at 32 px)."""
    heads, head_dim = 4, 8
    side = resolution // 2
    return SD3Transformer2DModel(
        sample_size=side, patch_size=PATCH, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=max(side // PATCH, 1),
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def build_tiny_sd3(
    seed: int = 0,
    resolution: int = 32,
    guidance_scale: float = 4.5,
    lora: Mapping[str, Any] | None = None,
    offload_text_encoders: bool = False,
) -> SD3Policy:
    """Hydra target of conf/model/tiny_sd3.yaml: same seed, same weights (LoRA init included).

    Latents are 16 x resolution/2 x resolution/2; prompts take 32 CLIP and 32 T5 tokens. The
    global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5_tokenizer = tiny_t5_tokenizer(MAX_TOKENS)
        return SD3Policy(
            _transformer(resolution), tiny_vae(resolution, **SD3_VAE),
            (_clip(CLIP_L_WIDTH), _clip(CLIP_G_WIDTH), tiny_t5_encoder(t5_tokenizer, T5_WIDTH)),
            (tiny_tokenizer(), tiny_tokenizer(), t5_tokenizer), FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
            resolution=resolution, guidance_scale=guidance_scale, max_sequence_length=MAX_TOKENS, lora=lora,
            offload_text_encoders=offload_text_encoders,
        )


def save_tiny_sd3(directory: Path | str, seed: int = 0, resolution: int = 32) -> Path:
    """Write the tiny model as a diffusers pipeline folder; `model=sd35_medium model.pretrained=<folder>` loads it."""
    return build_tiny_sd3(seed, resolution).save_pretrained(directory)
