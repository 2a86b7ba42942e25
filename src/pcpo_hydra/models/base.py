"""`PolicyModel`: the one interface the rollout and the update use, whatever the model family.

Classifier-free guidance, the text-embedding cache (and unloading the text encoders behind it),
the reference policy of the KL penalty, the frozen VAE and text encoders (freezing, placement,
decoding), and the trainable-weight bookkeeping live here once; a family adds text encoding, one
raw network call and its latent shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pcpo_hydra.images import from_signed
from pcpo_hydra.models.text_cache import TextEmbeddingCache
from pcpo_hydra.models.trainable import LoraWeights, TrainableWeights, place_module

log = logging.getLogger(__name__)


def token_ids(tokenizer: Any, prompts: list[str], length: int, encoder: nn.Module) -> Tensor:
    """Ids padded and truncated to `length`, on the encoder's device (offloading may keep it off the GPU).

    Lists -> tensor here: the tokenizer's return_tensors="pt" costs more than a tiny text encoder.
    """
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    return torch.tensor(ids, device=encoder.device)


class PolicyModel(ABC):
    """A denoiser being trained plus the frozen parts around it.

    `network` is what the optimizer trains; the trainer may replace it with an accelerator-wrapped
    module, so every forward goes through `self.network` while weights are read from the module
    the policy was built with.
    """

    def __init__(
        self,
        network: nn.Module,
        scheduler: Any,
        guidance_scale: float,
        weights: TrainableWeights,
        *,
        vae: nn.Module,
        text_encoders: list[nn.Module],
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
    ) -> None:
        """`vae` and `text_encoders` are frozen here; `network` trains as `weights` decides."""
        if guidance_scale < 1.0:
            raise ValueError(f"model.guidance_scale must be >= 1.0 (1.0: no guidance), got {guidance_scale}")
        self.network = network
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self._guidance_on = True  # off only inside `guided(False)`: training without guidance (train.cfg)
        self.weights = weights
        self.offload_text_encoders = offload_text_encoders
        self.text_cache = TextEmbeddingCache(None, "memory")
        self._module = network
        self._weight_dtype = torch.float32
        self._uncond: dict[str, Tensor] | None = None
        self._text_offloaded = False
        self.vae = vae
        self._text_encoders = list(text_encoders)
        for frozen in (vae, *self._text_encoders):
            frozen.requires_grad_(False).eval()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        weights.attach(network)
        if gradient_checkpointing:
            network.enable_gradient_checkpointing()

    # ---- what a model family provides --------------------------------------------------------

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent at the configured resolution."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Batch-first conditioning tensors, computed without gradients."""

    @abstractmethod
    def forward_network(
        self, network: nn.Module, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor]
    ) -> Tensor:
        """One call of `network` (the policy's, or the KL reference) on the batch as given (no guidance).

        `timestep` is in the sampler's units (0..1000); a family converts it to what its network takes.
        """

    def text_settings(self) -> dict[str, Any]:
        """Encoding settings beyond the encoders' weights that change an embedding (e.g. max length)."""
        return {}

    @abstractmethod
    def pipeline(self) -> Any:
        """These modules as the family's diffusers pipeline object (what `save_pretrained` writes)."""

    # ---- shared behaviour ---------------------------------------------------------------------

    def text_encoders(self) -> list[nn.Module]:
        """The text encoders `encode_prompts` runs: fingerprinted for the cache, unloaded by offloading."""
        return self._text_encoders

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images, float32 [B, 3, H, W] in [0, 1]: undo the VAE's scaling (and shift, SD3/FLUX), decode."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        images = self.vae.decode(scaled, return_dict=False)[0]
        return from_signed(images)

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the network's inputs: its frozen base's under LoRA, float32 when all of it trains."""
        return self.weights.network_dtype(self._weight_dtype)

    def predict(
        self, latents: Tensor, timestep: Tensor | int, cond: dict[str, Tensor], network: nn.Module | None = None
    ) -> Tensor:
        """Network output after guidance, f_u + g (f_c - f_u), from one call on the doubled batch.

        At scale 1.0, or inside `guided(False)`, it is the conditional output alone, from one call on the batch.
        """
        network = self.network if network is None else network
        timestep = torch.as_tensor(timestep, device=latents.device)
        if self.guidance_scale == 1.0 or not self._guidance_on:
            return self.forward_network(network, latents, timestep, cond)
        batch = latents.shape[0]
        uncond = self.unconditional()
        both = {k: torch.cat([uncond[k].expand(batch, *v.shape[1:]), v]) for k, v in cond.items()}
        timesteps = timestep.repeat(2) if timestep.ndim else timestep
        f_u, f_c = self.forward_network(network, torch.cat([latents, latents]), timesteps, both).chunk(2)
        return torch.lerp(f_u, f_c, self.guidance_scale)  # f_u + g (f_c - f_u) as one op, forward and back

    @contextmanager
    def guided(self, enabled: bool) -> Iterator[None]:
        """Within it, `predict` (and so `predict_reference`) applies classifier-free guidance only if `enabled`.

        The trainer runs its rollout and its update inside `guided(train.cfg)`: with train.cfg=false
        both sample and recompute the same unguided policy (Flow-GRPO's CFG-free training), while
        `guidance_scale` stays the user's for what runs outside, evaluation and pcpo-sample.
        """
        before, self._guidance_on = self._guidance_on, enabled
        try:
            yield
        finally:
            self._guidance_on = before

    @torch.no_grad()
    def predict_reference(self, latents: Tensor, timestep: Tensor | int, cond: dict[str, Tensor]) -> Tensor:
        """The reference policy's output (KL penalty): LoRA switched off, or the frozen initial copy."""
        with self.weights.reference(self._module) as reference:
            return self.predict(latents, timestep, cond, network=reference)

    def keep_reference(self) -> None:
        """Make `predict_reference` available; full fine-tuning keeps a frozen copy of the network now."""
        self.weights.keep_reference(self._module, self._weight_dtype)

    def unconditional(self) -> dict[str, Tensor]:
        """The empty prompt's conditioning, encoded once per placement."""
        if self._uncond is None:
            self._uncond = self.encode([""])
        return self._uncond

    # ---- text embeddings: cached by model and prompt ------------------------------------------

    def text_fingerprint(self) -> str:
        """What an embedding depends on: encoder classes, configs, dtypes, a sample of weights, settings.

        A weight sample (first values of each encoder's first and last tensor) tells apart two
        checkpoints of one architecture, and tiny models of different seeds, without hashing
        billions of weights.
        """
        digest = hashlib.sha256(type(self).__name__.encode())
        for encoder in self.text_encoders():
            config = encoder.config.to_json_string() if hasattr(encoder, "config") else ""
            params = list(encoder.parameters())
            digest.update(f"{type(encoder).__name__}|{config}|{params[0].dtype}".encode())
            for p in (params[0], params[-1]):
                digest.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
        digest.update(json.dumps(self.text_settings(), sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def use_text_cache(self, directory: Path | str | None) -> None:
        """Cache embeddings under `directory` (None: in memory only), keyed by `text_fingerprint`."""
        self.text_cache = TextEmbeddingCache(directory, self.text_fingerprint())
        self._uncond = None

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """`encode_prompts` through the cache: only prompts it has not seen reach the text encoders."""
        found, missing = self.text_cache.lookup(prompts)
        if missing:
            if self._text_offloaded:
                log.warning("%d prompt(s) not in the text cache: encoding them with the offloaded "
                            "text encoders (on the CPU)", len(missing))
            encoded = self.encode_prompts(missing)
            for k, prompt in enumerate(missing):
                found[prompt] = self.text_cache.store(prompt, {key: v[k] for key, v in encoded.items()})
        keys = found[prompts[0]].keys()
        return {key: torch.stack([found[p][key] for p in prompts]).to(self.device) for key in keys}

    def prepare_text(self, prompts: list[str]) -> None:
        """With `offload_text_encoders`: embed every prompt (and "") now, then unload the encoders."""
        if not self.offload_text_encoders:
            return
        self.encode(list(dict.fromkeys(["", *prompts])))
        self._text_offloaded = True
        self._offload_encoders()

    def _offload_encoders(self) -> None:
        for encoder in self.text_encoders():
            place_module(encoder, torch.device("cpu"), next(encoder.parameters()).dtype)

    def save_pretrained(self, directory: Path | str) -> Path:
        """Write a diffusers pipeline folder: what the family's loader and diffusers itself both read."""
        if isinstance(self.weights, LoraWeights):
            raise RuntimeError(
                "save_pretrained writes the base pipeline, but this network carries LoRA adapters: "
                "save the pipeline before LoRA is attached, and the adapters with save_trainable"
            )
        self.pipeline().save_pretrained(str(directory))
        return Path(directory)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.weights.parameters(self._module)

    def save_trainable(self, directory: Path) -> None:
        self.weights.save(self._module, Path(directory))

    def load_trainable(self, directory: Path) -> None:
        self.weights.load(self._module, Path(directory))

    def to(self, device: torch.device | str, weight_dtype: torch.dtype = torch.float32) -> PolicyModel:
        """Frozen modules to `weight_dtype`; trained weights stay float32."""
        device = torch.device(device)
        self._weight_dtype = weight_dtype
        self.weights.place(self._module, device, weight_dtype)
        for frozen in (self.vae, *self._text_encoders):
            place_module(frozen, device, weight_dtype)
        if self._text_offloaded:
            self._offload_encoders()
        self._uncond = None
        return self
