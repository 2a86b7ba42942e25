"""The SDE window: which contiguous steps of each epoch's rollouts are stochastic and trained.

Flow-GRPO-Fast and MixGRPO sample most of a trajectory deterministically (DDIM at eta 0, the flow
ODE) and inject noise only in a window of a few steps; only those steps have a log-density, so
only they are stored and trained, and the update costs size / num_steps of a full one. The
window's first step is a pure function of (seed, epoch, this config), so a resumed run samples
the windows an uninterrupted one would, with nothing to checkpoint. Torch-free: validation and
the config checks import it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

PLACEMENTS = ("fixed", "random", "sliding")


@dataclass(frozen=True)
class SDEWindow:
    """`size` stochastic steps starting at `start(epoch)`, inside the steps [first, end)."""

    size: int
    placement: str
    first: int
    end: int
    every: int
    stride: int
    seed: int

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"sampler.sde_window.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not (self.size >= 1 and 0 <= self.first and self.first + self.size <= self.end):
            raise ValueError(f"sampler.sde_window: {self.size} steps do not fit in [{self.first}, {self.end})")

    @classmethod
    def from_config(cls, node: Any, seed: int) -> SDEWindow | None:
        """The window a sampler node's `sde_window` describes; None when it has none (no node, or size null)."""
        window = node.get("sde_window") if node is not None else None
        if window is None or window.get("size") is None:
            return None
        first, end = window.get("range") or (0, node["num_steps"])
        return cls(int(window["size"]), str(window["placement"]), int(first), int(end),
                   int(window["every"]), int(window["stride"]), int(seed))

    def start(self, epoch: int) -> int:
        """The window's first step in the rollouts of `epoch` (counted from 1).

        fixed: the range's first step. random: uniform over the starts that fit, drawn per epoch
        from the run's seed (Flow-GRPO-Fast draws one per rollout call). sliding: from the range's
        first step, `stride` steps on every `every` epochs, from high noise to low; once it would
        leave the range it starts over at the first step (MixGRPO's roll-back).
        """
        last = self.end - self.size
        if self.placement == "fixed":
            return self.first
        if self.placement == "random":
            return random.Random(f"sde-window:{self.seed}:{epoch}").randint(self.first, last)
        positions = (last - self.first) // self.stride + 1
        return self.first + self.stride * (((epoch - 1) // self.every) % positions)
