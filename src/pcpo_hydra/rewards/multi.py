"""A weighted sum of named rewards, each also reported on its own.

Multi-objective runs (DanceGRPO's HPS + CLIPScore, aesthetic + text rendering) need to see which
component moved: the loop logs every part as `reward/<name>_*` beside the total. A component that
fails for a sample (NaN or inf) makes that sample's total non-finite, so the sample is left out of
advantage normalisation like any failed reward, and the part's own non-finite count is logged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pcpo_hydra.rewards.base import Reward, validate_inputs


class MultiReward:
    """sum_k weights[k] * components[k](images, prompts); components keep their own batching and devices."""

    name = "multi"

    def __init__(self, components: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        if not components:
            raise ValueError("reward.components is empty: a multi reward needs at least one component")
        if set(components) != set(weights):
            raise ValueError(
                f"reward.weights must name exactly the components {sorted(components)}, got {sorted(weights)}"
            )
        self.components = dict(components)
        self.weights = {name: float(weights[name]) for name in self.components}

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.score_parts(images, prompts)[0]

    def score_parts(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total [B] (float32, CPU) and each component's own rewards, by name."""
        validate_inputs(images, prompts)
        parts = {name: reward(images, prompts).float().cpu() for name, reward in self.components.items()}
        total = torch.zeros(len(prompts))
        for name, values in parts.items():
            total += self.weights[name] * values
        return total, parts
