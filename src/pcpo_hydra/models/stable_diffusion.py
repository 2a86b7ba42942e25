"""Stable Diffusion 1.x and 2.x as a policy: CLIP text encoder, UNet denoiser (epsilon), KL-VAE, DDIM schedule.

SD 2.x (e.g. stabilityai/sd-turbo) differs from 1.x only in sizes and options the diffusers and
transformers classes read from their configs (OpenCLIP-H as a 23-layer CLIPTextModel, linear
attention projections, per-block head counts), so one adapter serves both. What it cannot serve is
v-prediction (SD 2.x at 768 px): the loader refuses it rather than train on a misread output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from pcpo_hydra.models.base import PolicyModel, token_ids
from pcpo_hydra.models.trainable import trainable_weights
from pcpo_hydra.weights import check_source, load_component, load_error


class StableDiffusionPolicy(PolicyModel):
    """Text -> CLIP embeddings -> UNet epsilon under guidance; latents -> VAE -> images.

    VAE and text encoder are always frozen; the UNet trains whole or through LoRA (`lora`).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
        *,
        resolution: int | None = None,
        guidance_scale: float,
        lora: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
    ) -> None:
        super().__init__(
            unet, scheduler, guidance_scale, trainable_weights(lora), vae=vae, text_encoders=[text_encoder],
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
        )
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        default = unet.config.sample_size * self.vae_scale_factor
        self.resolution = default if resolution is None else resolution
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"model.resolution={self.resolution} must be a multiple of the VAE's downsampling "
                f"factor {self.vae_scale_factor}"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, L, D]}: CLIP's last hidden state, prompts padded to the full length."""
        ids = token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.text_encoder)
        return {"prompt_embeds": self.text_encoder(ids).last_hidden_state}

    def forward_network(
        self, network: nn.Module, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor]
    ) -> Tensor:
        return network(
            latents.to(self.dtype), timestep,
            encoder_hidden_states=cond["prompt_embeds"].to(self.dtype), return_dict=False,
        )[0]

    def pipeline(self) -> Any:
        """These modules as a diffusers StableDiffusionPipeline (what `load_stable_diffusion` reads back)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )


def load_stable_diffusion(
    pretrained: str,
    revision: str | None = None,
    resolution: int | None = None,
    *,
    guidance_scale: float,
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    offload_text_encoders: bool = False,
) -> StableDiffusionPolicy:
    """Hydra target of conf/model/sd1*.yaml and sd_turbo.yaml: each component from a hub id or a local pipeline folder.

    `resolution` None takes the UNet's own (sample_size x VAE factor: 512 for SD 1.x and sd-turbo);
    `lora` None or {enabled: false} fine-tunes the whole UNet. `guidance_scale` has no default: it
    belongs to the checkpoint (SD 1.5 is sampled at 5.0, sd-turbo, distilled to sample unguided, at
    1.0), and each conf/model option says its own. The scheduler is always DDIM, built from the
    pipeline's scheduler config (as DDPO and SDPO do), whatever scheduler class the pipeline names:
    diffusers' DDIMScheduler keeps the config's timestep_spacing, so sd-turbo's "trailing" gives
    t = 999 for one step and 999, 749, 499, 249 for four.
    """
    check_source(pretrained, revision)
    # Small files first, so a missing model fails before any large download.
    scheduler = load_component(DDIMScheduler, pretrained, "scheduler", revision)
    if scheduler.config.prediction_type != "epsilon":
        raise load_error(
            pretrained, "scheduler", revision,
            f"its UNet predicts {scheduler.config.prediction_type!r}, and DDIM here steps epsilon predictions only",
            fix="use an epsilon-prediction checkpoint (SD 1.x, stable-diffusion-2-1-base, sd-turbo)",
        )
    tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer", revision)
    text_encoder = load_component(CLIPTextModel, pretrained, "text_encoder", revision)
    vae = load_component(AutoencoderKL, pretrained, "vae", revision)
    unet = load_component(UNet2DConditionModel, pretrained, "unet", revision)
    return StableDiffusionPolicy(
        unet, vae, text_encoder, tokenizer, scheduler, resolution=resolution,
        guidance_scale=guidance_scale, lora=lora, gradient_checkpointing=gradient_checkpointing,
        offload_text_encoders=offload_text_encoders,
    )
