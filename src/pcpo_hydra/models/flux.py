"""FLUX.1 as a policy: CLIP (pooled) + T5 text, a rectified-flow transformer on 2x2-patch tokens, KL-VAE.

The samplers see unpacked latents [B, C, h, w] and the scheduler's timestep (sigma * 1000); packing
into tokens, the rotary position ids, the division by 1000 and the distilled guidance embedding are
FLUX's own conventions and stay inside `forward_network`, as they do inside diffusers' FluxPipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from pcpo_hydra.models.base import PolicyModel, token_ids
from pcpo_hydra.models.trainable import trainable_weights
from pcpo_hydra.samplers.flow_sde import TIMESTEP_SCALE, flux_sigmas
from pcpo_hydra.weights import WeightsFor, check_source, load_component

FLUX_PIPELINE = WeightsFor(
    "model", "model.pretrained",
    "a FLUX pipeline folder saved with save_pretrained, holding transformer/ vae/ text_encoder/ "
    "text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/",
)
PATCH = 2                  # FLUX packs 2x2 latent pixels into one token
MAX_T5_TOKENS = 512        # the longest T5 sequence FLUX was trained with (FluxPipeline rejects more)
REPRODUCED_SCHEDULE = {    # FlowMatchEulerDiscreteScheduler settings that `flux_sigmas` assumes
    "use_dynamic_shifting": True, "time_shift_type": "exponential", "shift_terminal": None,
    "invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
}


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C] tokens, row-major over patches, channel-major within one."""
    return F.pixel_unshuffle(latents, PATCH).flatten(2).transpose(1, 2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width`."""
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, height // PATCH, width // PATCH)
    return F.pixel_shuffle(grid, PATCH)


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[rows * cols, 3] rotary position ids of the patch tokens: (0, row, col), row-major."""
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(row), row, col], dim=-1).reshape(-1, 3).to(device, dtype)


def _check_schedule(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler whose schedule `flux_sigmas` would not reproduce (FLUX.1's is shifted by exp(mu) only)."""
    different = {key: config.get(key) for key, value in REPRODUCED_SCHEDULE.items() if config.get(key, value) != value}
    if different:
        raise ValueError(
            f"model.pretrained: scheduler settings {different} differ from FLUX.1's {REPRODUCED_SCHEDULE}; "
            "this adapter reproduces only FLUX.1's dynamically shifted flow-matching schedule"
        )


class FluxPolicy(PolicyModel):
    """Text -> (T5 tokens, pooled CLIP) -> transformer velocity, with FLUX's distilled `guidance` embedded.

    `guidance_scale` is true classifier-free guidance through the base class (a second, unconditional
    batch; 1.0 is off, as FLUX.1-dev is normally run), independent of `guidance`, which the
    guidance-distilled transformer takes as an input. VAE and text encoders are frozen; the
    transformer trains whole or through LoRA (`lora`).
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        resolution: int,
        guidance_scale: float,
        guidance: float,
        max_sequence_length: int,
        lora: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
    ) -> None:
        super().__init__(
            transformer, scheduler, guidance_scale, trainable_weights(lora), vae=vae,
            text_encoders=[text_encoder, text_encoder_2], gradient_checkpointing=gradient_checkpointing,
            offload_text_encoders=offload_text_encoders,
        )
        self.transformer = transformer
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        _check_schedule(scheduler.config)
        if not 0 < max_sequence_length <= MAX_T5_TOKENS:
            raise ValueError(f"model.max_sequence_length must be in 1..{MAX_T5_TOKENS}, got {max_sequence_length}")
        self.guidance = float(guidance)
        self.max_sequence_length = max_sequence_length
        self.resolution = resolution
        multiple = self.vae_scale_factor * PATCH
        if resolution % multiple:
            raise ValueError(
                f"model.resolution={resolution} must be a multiple of {multiple} (the VAE's downsampling "
                f"factor {self.vae_scale_factor} x FLUX's {PATCH}x{PATCH} latent patches)"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels // PATCH**2, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": T5's last hidden state [B, L, D], "pooled_prompt_embeds": CLIP's pooled output [B, P]}.

        Both tokenizers pad to their full length (CLIP's model_max_length, `max_sequence_length` for T5).
        """
        clip_ids = token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.text_encoder)
        t5_ids = token_ids(self.tokenizer_2, prompts, self.max_sequence_length, self.text_encoder_2)
        return {
            "prompt_embeds": self.text_encoder_2(t5_ids).last_hidden_state,
            "pooled_prompt_embeds": self.text_encoder(clip_ids).pooler_output,
        }

    def forward_network(
        self, network: nn.Module, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor]
    ) -> Tensor:
        """The transformer on packed tokens at sigma = timestep / 1000, with the distilled guidance embedded."""
        batch, _, height, width = latents.shape
        embeds = cond["prompt_embeds"].to(self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=latents.device, dtype=torch.float32)
        tokens = network(
            hidden_states=pack_latents(latents.to(self.dtype)),
            timestep=timestep.to(latents.device).expand(batch).to(self.dtype) / TIMESTEP_SCALE,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(self.dtype),
            encoder_hidden_states=embeds,
            txt_ids=embeds.new_zeros(embeds.shape[1], 3),
            img_ids=image_ids(height // PATCH, width // PATCH, latents.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)

    def flow_sigmas(self, num_steps: int) -> Tensor:
        """FluxPipeline's schedule at this resolution: shifted by exp(mu), mu set by the latent token count."""
        config = self.scheduler.config
        _, height, width = self.latent_shape
        return flux_sigmas(
            num_steps, (height // PATCH) * (width // PATCH),
            base_seq_len=config.base_image_seq_len, max_seq_len=config.max_image_seq_len,
            base_shift=config.base_shift, max_shift=config.max_shift,
        )

    def text_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def pipeline(self) -> Any:
        """These modules as a diffusers FluxPipeline (what `load_flux` reads back)."""
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, transformer=self.transformer,
        )


def load_flux(
    pretrained: str,
    revision: str | None = None,
    *,
    resolution: int,
    guidance_scale: float = 1.0,
    guidance: float = 3.5,
    max_sequence_length: int = MAX_T5_TOKENS,
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    offload_text_encoders: bool = False,
) -> FluxPolicy:
    """Hydra target of conf/model/flux.yaml: each component from a hub id or a local pipeline folder.

    `lora` None or {enabled: false} fine-tunes the whole transformer.
    """
    check_source(pretrained, revision, FLUX_PIPELINE)

    def load(loader: Any, subfolder: str) -> Any:
        return load_component(loader, pretrained, subfolder, revision, FLUX_PIPELINE)

    # Small files first, so a missing model fails before any large download.
    scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
    tokenizer, tokenizer_2 = load(CLIPTokenizer, "tokenizer"), load(T5TokenizerFast, "tokenizer_2")
    text_encoder, text_encoder_2 = load(CLIPTextModel, "text_encoder"), load(T5EncoderModel, "text_encoder_2")
    vae = load(AutoencoderKL, "vae")
    transformer = load(FluxTransformer2DModel, "transformer")
    return FluxPolicy(
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
        resolution=resolution, guidance_scale=guidance_scale, guidance=guidance,
        max_sequence_length=max_sequence_length, lora=lora, gradient_checkpointing=gradient_checkpointing,
        offload_text_encoders=offload_text_encoders,
    )
