"""Pretraining the world's base models: the VAE as an autoencoder, then each denoiser on its latents.

Denoisers train with their text encoders (the tiny encoders are random, and a one-layer character
model has to learn which letters make a colour word), through the policy's own text encoding and
network call, so pretraining and RL see the same conditioning. Captions are dropped to "" at
`CAPTION_DROPOUT`, which is what the unconditional half of classifier-free guidance reads.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from pcpo_hydra.models.base import PolicyModel
from pcpo_shapes_world.render import render
from pcpo_shapes_world.scenes import sample_scenes

CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-4        # per latent element, against the per-pixel MSE: latents stay near N(0, 1) without blurring
WARMUP_STEPS = 50
RENDER_CHUNK = 256      # scenes rendered at once (the 4x supersampled grid of a chunk is ~70 MB)


@dataclass
class WorldData:
    """A fixed set of world renders and their captions, the pretraining data."""

    images: Tensor            # [N, 3, H, W] in [0, 1]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def world_data(count: int, seed: int, resolution: int) -> WorldData:
    """`count` scenes drawn from `seed`, rendered; the same arguments give the same data."""
    scenes = sample_scenes(count, seed)
    images = torch.cat([render(scenes[k : k + RENDER_CHUNK], resolution) for k in range(0, count, RENDER_CHUNK)])
    return WorldData(images, [scene.caption for scene in scenes])


@dataclass
class TrainLog:
    """Loss per step and wall seconds, for the report."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, parts: int = 5) -> list[float]:
        """Mean loss over each of `parts` equal stretches of training: the loss curve in a few numbers."""
        size = max(1, len(self.losses) // parts)
        return [sum(chunk) / len(chunk) for chunk in (self.losses[k : k + size] for k in range(0, len(self.losses), size))][:parts]


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to a tenth: short runs end on small, careful steps."""

    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimise(
    parameters: Sequence[nn.Parameter], loss_of_step: Callable[[Tensor], Tensor], steps: int, batch_size: int,
    size: int, lr: float, generator: torch.Generator,
) -> TrainLog:
    """`steps` AdamW steps, each on the loss of a random batch of indices into a dataset of `size`."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps)
    log, start = TrainLog(), time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(size, (batch_size,), generator=generator)
        loss = loss_of_step(rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        log.losses.append(loss.item())
    log.seconds = time.perf_counter() - start
    return log


def train_vae(
    vae: AutoencoderKL, data: WorldData, steps: int, batch_size: int, lr: float, generator: torch.Generator
) -> TrainLog:
    """Autoencoder training: MSE of the reconstruction of a posterior sample, plus a light KL to N(0, I)."""
    vae.train().requires_grad_(True)
    pixels = data.images * 2 - 1

    def loss(rows: Tensor) -> Tensor:
        x = pixels[rows]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl() / posterior.mean[0].numel()
        return (reconstruction - x).pow(2).mean() + KL_WEIGHT * kl.mean()

    log = optimise(list(vae.parameters()), loss, steps, batch_size, len(data), lr, generator)
    vae.eval().requires_grad_(False)
    return log


@dataclass
class Latents:
    """The VAE posterior of every image, unscaled: what a denoiser's training samples are drawn from."""

    mean: Tensor
    std: Tensor

    def sample(self, rows: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(self.mean[rows].shape, generator=generator)
        return self.mean[rows] + self.std[rows] * noise


@torch.no_grad()
def encode(vae: AutoencoderKL, data: WorldData) -> Latents:
    chunks = [vae.encode(data.images[k : k + RENDER_CHUNK] * 2 - 1).latent_dist for k in range(0, len(data), RENDER_CHUNK)]
    return Latents(torch.cat([c.mean for c in chunks]), torch.cat([c.std for c in chunks]))


def with_latent_scale(vae: AutoencoderKL, latents: Latents, shift: bool) -> AutoencoderKL:
    """A copy of `vae` whose scaling (and with `shift`, shift) factor make the latents zero-mean, unit-std.

    SD 1.x scales only (its latents are near zero-mean); SD3 and FLUX also shift, as their VAEs do.
    """
    mean, std = latents.mean.mean().item(), latents.mean.std().item()
    scaled = copy.deepcopy(vae)
    scaled.register_to_config(scaling_factor=1.0 / std, shift_factor=mean if shift else None)
    return scaled


def scaled_latents(policy: PolicyModel, latents: Latents, rows: Tensor, generator: torch.Generator) -> Tensor:
    """Posterior samples as the denoiser sees them: (z - shift) x scaling, the inverse of `decode`'s."""
    config = policy.vae.config
    return (latents.sample(rows, generator) - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor


def encode_with_grad(policy: PolicyModel, captions: list[str]) -> dict[str, Tensor]:
    """The policy's own `encode_prompts` (which runs under no_grad for RL) with gradients to the encoders."""
    unique = list(dict.fromkeys(captions))
    encoded = type(policy).encode_prompts.__wrapped__(policy, unique)
    rows = torch.tensor([unique.index(c) for c in captions])
    return {key: value[rows] for key, value in encoded.items()}


def epsilon_loss(policy: PolicyModel, x0: Tensor, cond: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """DDPM's objective: MSE of the predicted noise at a uniform training timestep (SD 1.x)."""
    alphas = policy.scheduler.alphas_cumprod
    t = torch.randint(len(alphas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    alpha = alphas[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    return (policy.forward_network(policy.network, noisy, t, cond) - noise).pow(2).mean()


def velocity_loss(policy: PolicyModel, x0: Tensor, cond: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """Flow matching: MSE of the velocity noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise (SD3).

    sigma is uniform time passed through the scheduler's shift, so training visits noise levels as
    often as the shifted sampling schedule does.
    """
    shift = policy.scheduler.config.shift
    u = torch.rand(x0.shape[0], generator=generator)
    sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = (1 - sigma) * x0 + sigma * noise
    timestep = sigma.flatten() * policy.scheduler.config.num_train_timesteps
    return (policy.forward_network(policy.network, noisy, timestep, cond) - (noise - x0)).pow(2).mean()


Objective = Callable[[PolicyModel, Tensor, dict[str, Tensor], torch.Generator], Tensor]


def train_denoiser(
    policy: PolicyModel, objective: Objective, data: WorldData, latents: Latents, steps: int, batch_size: int,
    lr: float, generator: torch.Generator,
) -> TrainLog:
    """Train the policy's network and text encoders on (latent, caption) pairs; encoders are frozen again after."""
    encoders = policy.text_encoders()
    for encoder in encoders:
        encoder.train().requires_grad_(True)
    policy.network.train()
    parameters = [*policy.trainable_parameters(), *(p for e in encoders for p in e.parameters())]

    def loss(rows: Tensor) -> Tensor:
        drop = torch.rand(len(rows), generator=generator) < CAPTION_DROPOUT
        captions = ["" if dropped else data.captions[k] for k, dropped in zip(rows.tolist(), drop.tolist())]
        x0 = scaled_latents(policy, latents, rows, generator)
        return objective(policy, x0, encode_with_grad(policy, captions), generator)

    log = optimise(parameters, loss, steps, batch_size, len(data), lr, generator)
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
    policy.network.eval()
    return log
