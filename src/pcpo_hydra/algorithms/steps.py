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
