"""Stable Diffusion 3 / 3.5 as a policy: CLIP-L, CLIP-G and T5 text, MMDiT velocity, shifted flow schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from pcpo_hydra.models.base import PolicyModel, token_ids
from pcpo_hydra.models.trainable import trainable_weights
from pcpo_hydra.samplers.flow_sde import sd3_sigmas
from pcpo_hydra.weights import WeightsFor, check_source, load_component

SD3_PIPELINE = WeightsFor(
    "model", "model.pretrained",
    "a pipeline folder saved with save_pretrained, holding transformer/ vae/ text_encoder/ text_encoder_2/ "
    "text_encoder_3/ tokenizer/ tokenizer_2/ tokenizer_3/ scheduler/",
)
# Scheduler options whose schedule `sd3_sigmas` (static shift only, as SD3/3.5 ship) does not reproduce.
UNSUPPORTED_SCHEDULES = (
    "use_dynamic_shifting", "shift_terminal", "invert_sigmas",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
)


class SD3Policy(PolicyModel):
    """Text -> (CLIP-L, CLIP-G, T5) embeddings -> MMDiT velocity under guidance; latents -> VAE -> images.

    VAE and the three text encoders are always frozen; the transformer trains whole or through LoRA.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel],
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer, T5TokenizerFast],
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        resolution: int | None = None,
        guidance_scale: float,
        max_sequence_length: int,
        lora: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
    ) -> None:
        super().__init__(
            transformer, scheduler, guidance_scale, trainable_weights(lora), vae=vae,
            text_encoders=list(text_encoders), gradient_checkpointing=gradient_checkpointing,
            offload_text_encoders=offload_text_encoders,
        )
        self.transformer = transformer
        self.clip_l, self.clip_g, self.t5 = text_encoders
        self.tokenizers = tokenizers
        self.max_sequence_length = max_sequence_length
        default = transformer.config.sample_size * self.vae_scale_factor
        self.resolution = default if resolution is None else resolution
        self._check_resolution()
        self._check_scheduler()

    def _check_resolution(self) -> None:
        """Latents must cut into whole patches, and no more of them per side than the position table holds."""
        patch = self.transformer.config.patch_size
        step = self.vae_scale_factor * patch
        largest = self.transformer.config.pos_embed_max_size * step
        if self.resolution % step or not 0 < self.resolution <= largest:
            raise ValueError(
                f"model.resolution={self.resolution} must be a positive multiple of {step} (VAE factor "
                f"{self.vae_scale_factor} x patch size {patch}) and at most {largest} (the transformer's "
                f"pos_embed_max_size {self.transformer.config.pos_embed_max_size} patches per side)"
            )

    def _check_scheduler(self) -> None:
        """flow_sigmas reproduces a statically shifted schedule only; refuse what would silently differ."""
        found = [key for key in UNSUPPORTED_SCHEDULES if self.scheduler.config.get(key)]
        if found:
            raise ValueError(f"the pipeline's scheduler sets {found}: only SD3's static shift is supported")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """As SD3's pipeline: CLIP-L|G penultimate states side by side, zero-padded to T5's width,
        followed by T5's tokens on the sequence axis; pooled = CLIP-L|G projected text embeddings."""
        clip_length = self.tokenizers[0].model_max_length  # the pipeline pads both CLIPs to CLIP-L's length
        clip_states, pooled = zip(*(
            self._clip(encoder, tokenizer, prompts, clip_length)
            for encoder, tokenizer in zip((self.clip_l, self.clip_g), self.tokenizers[:2])
        ))
        t5_ids = token_ids(self.tokenizers[2], prompts, self.max_sequence_length, self.t5)
        t5_states = self.t5(t5_ids).last_hidden_state
        clip_states = torch.cat(clip_states, dim=-1)
        clip_states = nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_states, t5_states], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def _clip(
        self, encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, prompts: list[str], length: int
    ) -> tuple[Tensor, Tensor]:
        """(penultimate hidden states, projected pooled embedding) of one CLIP encoder."""
        out = encoder(token_ids(tokenizer, prompts, length, encoder), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def forward_network(
        self, network: nn.Module, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor]
    ) -> Tensor:
        """The transformer takes sigma * 1000 (the sampler's units) as the pipeline passes it, one per sample."""
        return network(
            hidden_states=latents.to(self.dtype),
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=cond["prompt_embeds"].to(self.dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(self.dtype),
            return_dict=False,
        )[0]

    def flow_sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule: `set_timesteps(num_steps)` of the shifted scheduler, then 0."""
        config = self.scheduler.config
        return sd3_sigmas(num_steps, shift=config.shift, num_train_timesteps=config.num_train_timesteps)

    def text_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def pipeline(self) -> Any:
        """These modules as a diffusers StableDiffusion3Pipeline (what `load_sd3` reads back)."""
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=self.scheduler, vae=self.vae,
            text_encoder=self.clip_l, tokenizer=self.tokenizers[0],
            text_encoder_2=self.clip_g, tokenizer_2=self.tokenizers[1],
            text_encoder_3=self.t5, tokenizer_3=self.tokenizers[2],
        )


def load_sd3(
    pretrained: str,
    revision: str | None = None,
    *,
    resolution: int | None = None,
    guidance_scale: float = 4.5,
    max_sequence_length: int,  # no default: the options of conf/model/ that load SD3 set different ones
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    offload_text_encoders: bool = False,
) -> SD3Policy:
    """Hydra target of conf/model/sd35_medium.yaml: each component from a hub id or a local pipeline folder.

    `resolution` None takes the transformer's own (sample_size x VAE factor: 1024 for SD3.5-M);
    `lora` None or {enabled: false} fine-tunes the whole transformer.
    """
    check_source(pretrained, revision, SD3_PIPELINE)

    def load(loader: Any, subfolder: str) -> Any:
        return load_component(loader, pretrained, subfolder, revision, SD3_PIPELINE)

    # Small files first, so a missing model fails before any large download.
    scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
    tokenizers = (load(CLIPTokenizer, "tokenizer"), load(CLIPTokenizer, "tokenizer_2"),
                  load(T5TokenizerFast, "tokenizer_3"))
    text_encoders = (load(CLIPTextModelWithProjection, "text_encoder"),
                     load(CLIPTextModelWithProjection, "text_encoder_2"), load(T5EncoderModel, "text_encoder_3"))
    vae = load(AutoencoderKL, "vae")
    transformer = load(SD3Transformer2DModel, "transformer")
    return SD3Policy(
        transformer, vae, text_encoders, tokenizers, scheduler, resolution=resolution,
        guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, lora=lora,
        gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
    )
