"""The world's base models: the tiny SD and SD3 classes, sized for 32 px shapes and world captions.

They differ from `pcpo_hydra.models.tiny` / `tiny_sd3` (whose random weights are the embedded
default's) in three ways the world needs:

- a VAE that is trained (`pretrain.train_vae`) rather than random: a diffusion model learnt in a
  random VAE's latent space decodes to noise. One VAE (4 latent channels, factor 2) serves both
  families, so both see the same latents; its scaling (and, for SD3, shift) factor is set from the
  latents of world renders, as SD and SD3 set theirs.
- 40 text positions instead of 32: the tiny tokenizers spend a token per character, and the longest
  caption ("a small yellow triangle at the bottom") takes 33 with CLIP's start and end tokens.
- the SD3 transformer reads the shared 4-channel latents (SD3 proper has 16).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pcpo_hydra.models.sd3 import SD3Policy
from pcpo_hydra.models.stable_diffusion import StableDiffusionPolicy
from pcpo_hydra.models.tiny import (
    SD_SCHEDULE, TEXT_WIDTH, tiny_clip_text_config, tiny_t5_encoder, tiny_t5_tokenizer, tiny_tokenizer, tiny_vae,
)
from pcpo_hydra.models.tiny_sd3 import CLIP_G_WIDTH, CLIP_L_WIDTH, SD35_SCHEDULER, T5_WIDTH

RESOLUTION = 32
TEXT_TOKENS = 40
LATENT_CHANNELS = 4
SD_GUIDANCE, SD3_GUIDANCE = 5.0, 4.5  # the tiny models' (and SD 1.5's / SD3.5's) guidance scales


def world_vae() -> AutoencoderKL:
    """16 channels at both levels, no resnets in the down and up blocks: ~20 k weights, cheap to train on a CPU.

    Four times the tiny VAE's width, which reconstructs world renders too blurrily to read the shape.
    """
    return tiny_vae(RESOLUTION, block_out_channels=(16, 16), norm_num_groups=4)


def clip_tokenizer() -> CLIPTokenizer:
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = TEXT_TOKENS
    return tokenizer


def _clip_config(width: int, layers: int):
    config = tiny_clip_text_config(clip_tokenizer(), width)
    config.max_position_embeddings, config.num_hidden_layers = TEXT_TOKENS, layers
    return config


def _unet() -> UNet2DConditionModel:
    """The tiny SD's UNet: two levels of 32 channels, text by cross-attention in the 8x8 mid block."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4,
    )


def _transformer() -> SD3Transformer2DModel:
    """The tiny SD3's MMDiT (2 blocks of 4 heads x 8, a dual-attention first block) on 4 latent channels."""
    heads, head_dim, side, patch = 4, 8, RESOLUTION // 2, 2
    return SD3Transformer2DModel(
        sample_size=side, patch_size=patch, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=side // patch,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def build_world_sd(vae: AutoencoderKL, seed: int = 0) -> StableDiffusionPolicy:
    """A fresh world SD around a trained `vae`: UNet and one-layer CLIP text encoder seeded by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StableDiffusionPolicy(
            _unet(), vae, CLIPTextModel(_clip_config(TEXT_WIDTH, 1)), clip_tokenizer(),
            DDIMScheduler(**SD_SCHEDULE), resolution=RESOLUTION, guidance_scale=SD_GUIDANCE,
        )


def build_world_sd3(vae: AutoencoderKL, seed: int = 0) -> SD3Policy:
    """A fresh world SD3 around a trained `vae`: MMDiT, two-layer CLIP-L/G and one-layer T5 seeded by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5_tokenizer = tiny_t5_tokenizer(TEXT_TOKENS)
        encoders = (
            CLIPTextModelWithProjection(_clip_config(CLIP_L_WIDTH, 2)),
            CLIPTextModelWithProjection(_clip_config(CLIP_G_WIDTH, 2)),
            tiny_t5_encoder(t5_tokenizer, T5_WIDTH),
        )
        return SD3Policy(
            _transformer(), vae, encoders, (clip_tokenizer(), clip_tokenizer(), t5_tokenizer),
            FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER), resolution=RESOLUTION,
            guidance_scale=SD3_GUIDANCE, max_sequence_length=TEXT_TOKENS,
        )
