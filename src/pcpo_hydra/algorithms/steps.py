"""Which sampler steps the update trains: shared by validation (torch-free) and the update itself."""

from __future__ import annotations


def trained_steps(num_steps: int, timestep_fraction: float) -> int:
    """How many of a sample's sampler steps the update trains (DDPO's timestep_fraction)."""
    return int(num_steps * timestep_fraction)
