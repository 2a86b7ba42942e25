"""Which sampler steps the update trains: shared by validation (torch-free) and the update itself."""

from __future__ import annotations

from typing import Any


def stored_steps(sampler: Any) -> int:
    """How many steps of each trajectory the rollout stores: the SDE window's size, else every step."""
    window = sampler.get("sde_window")
    return window.size if window is not None and window.get("size") is not None else sampler.num_steps


def trained_steps(num_steps: int, timestep_fraction: float) -> int:
    """How many of a sample's stored steps the update trains (DDPO's timestep_fraction)."""
    return int(num_steps * timestep_fraction)


def network_images_per_epoch(cfg: Any) -> dict[str, int]:
    """Images through the network per epoch, by phase, what an epoch's compute is proportional to.

    The rollout runs every step of every sample; the update the trained steps of the stored ones,
    `train.inner_epochs` times; both on the doubled batch where classifier-free guidance runs.
    Evaluations are left out.
    """
    samples = cfg.rollout.prompts_per_epoch * cfg.rollout.group_size
    guided = 2 if cfg.train.cfg and cfg.model.get("guidance_scale", 1.0) != 1.0 else 1
    trained = trained_steps(stored_steps(cfg.sampler), cfg.train.timestep_fraction)
    return {"rollout": samples * cfg.sampler.num_steps * guided,
            "update": samples * trained * guided * cfg.train.inner_epochs}
