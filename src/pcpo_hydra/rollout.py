"""Rollout: sample trajectories without gradients, keeping what the update recomputes against."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Trajectories:
    """One epoch's samples; per-step tensors are laid out [N, K, ...] (latents [N, K+1, ...]).

    K steps are stored: the sampler's noisy ones (`sampler.noisy_steps()`), all T of them or an
    SDE window's. Stored step k is sampler step `first_step + k`; latents[:, k] is the state it
    starts from, latents[:, k + 1] the state it reached.
    """

    prompts: list[str]
    cond: dict[str, Tensor]   # text conditioning, batch-first, one row per sample
    latents: Tensor           # x_first .. x_{first+K} of every trajectory
    outputs: Tensor           # f_old: network output after guidance at each stored step
    noise: Tensor             # z drawn at each stored step (the matching log-ratio needs it exactly)
    log_probs: Tensor         # direct log-prob of each stored step under the sampling policy
    images: Tensor            # decoded final latents, [N, 3, H, W] in [0, 1]
    first_step: int = 0       # the sampler step of stored step 0
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
def _sample_chunk(
    model, sampler, cond: dict[str, Tensor], generator: torch.Generator, same_noise: int = 1
) -> tuple[Tensor, ...]:
    """Every step runs; only the noisy ones are kept. Noise is drawn at every step, used or not,
    so a step's noise is the same whatever the window (one stream position per step).
    Each run of `same_noise` consecutive samples starts from one initial latent (SDPO's pairs)."""
    batch = next(iter(cond.values())).shape[0]
    if batch % same_noise:
        raise ValueError(f"a sampling batch of {batch} does not split into runs of {same_noise} sharing their noise")
    x = _randn((batch // same_noise, *model.latent_shape), generator).repeat_interleave(same_noise, 0).to(model.device)
    kept = sampler.noisy_steps()
    latents, outputs, noises, log_probs = [x] if kept.start == 0 else [], [], [], []
    for i in range(sampler.num_steps):
        f = model.predict(x, sampler.timestep(i), cond).float()
        z = _randn(tuple(x.shape), generator).to(x.device)
        x_next, _, _ = sampler.step(i, x, f, z)
        if i in kept:
            log_probs.append(sampler.log_prob(i, x, f, x_next))
            outputs.append(f)
            noises.append(z)
        if i in kept or i + 1 == kept.start:
            latents.append(x_next)
        x = x_next
    images = model.decode(x)
    return (torch.stack(latents, 1), torch.stack(outputs, 1), torch.stack(noises, 1),
            torch.stack(log_probs, 1), images)


def sample_trajectories(
    model, sampler, prompts: list[str], batch_size: int, generators: list[torch.Generator], same_noise: int = 1
) -> Trajectories:
    """Run the sampler for every prompt, `batch_size` trajectories per network call, batch k's noise from generators[k].

    `same_noise` > 1 starts each run of that many consecutive samples from the same initial latent.
    """
    starts = range(0, len(prompts), batch_size)
    if len(generators) != len(starts):
        raise ValueError(f"{len(generators)} noise generators for {len(starts)} batches of {batch_size}")
    cond = _encode(model, prompts)
    chunks = [
        _sample_chunk(model, sampler, {k: v[s : s + batch_size] for k, v in cond.items()}, generator, same_noise)
        for s, generator in zip(starts, generators)
    ]
    latents, outputs, noise, log_probs, images = (torch.cat(parts) for parts in zip(*chunks))
    return Trajectories(prompts, cond, latents, outputs, noise, log_probs, images,
                        first_step=sampler.noisy_steps().start)
