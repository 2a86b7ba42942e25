"""Rollout: sample trajectories without gradients, keeping what the update recomputes against."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Trajectories:
    """One epoch's samples; per-step tensors are laid out [N, T, ...] (latents [N, T+1, ...])."""

    prompts: list[str]
    cond: dict[str, Tensor]   # text conditioning, batch-first, one row per sample
    latents: Tensor           # x_0 .. x_T of every trajectory
    outputs: Tensor           # f_old: network output after guidance at each step
    noise: Tensor             # z drawn at each step (the matching log-ratio needs it exactly)
    log_probs: Tensor         # direct log-prob of each step under the sampling policy
    images: Tensor            # decoded final latents, [N, 3, H, W] in [0, 1]
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    kept: Tensor | None = None  # bool [N]: the samples the update trains on (None: all; rollout.drop_flat_groups)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Noise from the run's generator, on the generator's device, in float32."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _encode(model, prompts: list[str]) -> dict[str, Tensor]:
    """Encode each distinct prompt once (through the model's text cache) and gather one row per sample."""
    unique = list(dict.fromkeys(prompts))
    embeds = model.encode(unique)
    position = {p: k for k, p in enumerate(unique)}
    rows = torch.tensor([position[p] for p in prompts], device=next(iter(embeds.values())).device)
    return {key: value[rows] for key, value in embeds.items()}


@torch.no_grad()
def _sample_chunk(model, sampler, cond: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, ...]:
    batch = next(iter(cond.values())).shape[0]
    x = _randn((batch, *model.latent_shape), generator).to(model.device)
    latents, outputs, noises, log_probs = [x], [], [], []
    for i in range(sampler.num_steps):
        f = model.predict(x, sampler.timestep(i), cond).float()
        z = _randn(tuple(x.shape), generator).to(x.device)
        x_next, _, _ = sampler.step(i, x, f, z)
        log_probs.append(sampler.log_prob(i, x, f, x_next))
        latents.append(x_next)
        outputs.append(f)
        noises.append(z)
        x = x_next
    images = model.decode(x)
    return (torch.stack(latents, 1), torch.stack(outputs, 1), torch.stack(noises, 1),
            torch.stack(log_probs, 1), images)


def sample_trajectories(
    model, sampler, prompts: list[str], batch_size: int, generators: list[torch.Generator]
) -> Trajectories:
    """Run the sampler for every prompt, `batch_size` trajectories per network call, batch k's noise from generators[k]."""
    starts = range(0, len(prompts), batch_size)
    if len(generators) != len(starts):
        raise ValueError(f"{len(generators)} noise generators for {len(starts)} batches of {batch_size}")
    cond = _encode(model, prompts)
    chunks = [
        _sample_chunk(model, sampler, {k: v[s : s + batch_size] for k, v in cond.items()}, generator)
        for s, generator in zip(starts, generators)
    ]
    latents, outputs, noise, log_probs, images = (torch.cat(parts) for parts in zip(*chunks))
    return Trajectories(prompts, cond, latents, outputs, noise, log_probs, images)
