"""`PolicyModel`: the one interface the rollout and the update use, whatever the model family.

Classifier-free guidance, the cached unconditional embedding, placement on a device and the
trainable-weight bookkeeping live here once; a family adds text encoding, one raw network call,
decoding and its latent shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pcpo_hydra.models.trainable import TrainableWeights


class PolicyModel(ABC):
    """A denoiser being trained plus the frozen parts around it.

    `network` is what the optimizer trains; the trainer may replace it with an accelerator-wrapped
    module, so every forward goes through `self.network` while weights are read from the module
    the policy was built with.
    """

    def __init__(
        self, network: nn.Module, scheduler: Any, guidance_scale: float, weights: TrainableWeights
    ) -> None:
        if guidance_scale < 1.0:
            raise ValueError(f"model.guidance_scale must be >= 1.0 (1.0: no guidance), got {guidance_scale}")
        self.network = network
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.weights = weights
        self._module = network
        self._weight_dtype = torch.float32
        self._uncond: dict[str, Tensor] | None = None
        weights.attach(network)

    # ---- what a model family provides --------------------------------------------------------

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent at the configured resolution."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Batch-first conditioning tensors, computed without gradients."""

    @abstractmethod
    def forward_network(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One call of `self.network` on the batch as given (no guidance)."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images, float32 [B, 3, H, W] in [0, 1], without gradients."""

    @abstractmethod
    def _place_frozen(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move the frozen modules around the network (VAE, text encoders)."""

    # ---- shared behaviour ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the network's inputs: its frozen base's under LoRA, float32 when all of it trains."""
        return self.weights.network_dtype(self._weight_dtype)

    def predict(self, latents: Tensor, timestep: Tensor | int, cond: dict[str, Tensor]) -> Tensor:
        """Network output after guidance, f_u + g (f_c - f_u), from one call on the doubled batch."""
        timestep = torch.as_tensor(timestep, device=latents.device)
        if self.guidance_scale == 1.0:
            return self.forward_network(latents, timestep, cond)
        batch = latents.shape[0]
        uncond = self.unconditional()
        both = {k: torch.cat([uncond[k].expand(batch, *v.shape[1:]), v]) for k, v in cond.items()}
        timesteps = timestep.repeat(2) if timestep.ndim else timestep
        f_u, f_c = self.forward_network(torch.cat([latents, latents]), timesteps, both).chunk(2)
        return torch.lerp(f_u, f_c, self.guidance_scale)  # f_u + g (f_c - f_u) as one op, forward and back

    def unconditional(self) -> dict[str, Tensor]:
        """The empty prompt's conditioning, encoded once per placement."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

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
        self._place_frozen(device, weight_dtype)
        self._uncond = None
        return self
