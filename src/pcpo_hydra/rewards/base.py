"""The interface every reward implements; input checks and batching live here once.

A subclass sets `name` and implements `score` for one batch of at most `batch_size` images;
`__call__` validates what the loop passes, splits it, runs without autograd and checks that
each batch came back as one float per image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor

from pcpo_hydra.images import check_images

RANGE_TOLERANCE = 1e-3  # decoded images may overshoot [0, 1] by rounding; more is a caller bug


class Reward(Protocol):
    """What the loop calls: rewards [B] for images and prompts, and the named parts a composite reward sums."""

    name: str

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...

    def score_parts(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]: ...


class BaseReward(ABC):
    """Scores images [B, 3, H, W] in [0, 1] with their prompts; higher is better."""

    name: str  # short identifier, e.g. for metric names and logs

    def __init__(self, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"reward batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size

    @abstractmethod
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Rewards [b] for one validated batch of b <= batch_size images."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Rewards [B] as float32 on the device `score` returns them on; NaN marks a failed score."""
        validate_inputs(images, prompts)
        scores = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                stop = min(start + self.batch_size, len(prompts))
                batch_scores = self.score(images[start:stop], prompts[start:stop])
                scores.append(self._checked(batch_scores, stop - start))
        return torch.cat(scores)

    def score_parts(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The rewards and no parts: only a composite reward (rewards.multi) has parts to report."""
        return self(images, prompts), {}

    def _checked(self, scores: Tensor, expected: int) -> Tensor:
        """One float32 per image, or a RuntimeError naming the class whose `score` is wrong."""
        if scores.dim() != 1 or scores.numel() != expected:
            raise RuntimeError(
                f"{type(self).__name__}.score returned shape {tuple(scores.shape)} for {expected} images"
            )
        return scores.to(torch.float32)


def validate_inputs(images: Tensor, prompts: list[str]) -> None:
    """Raise ValueError unless images is a float [B, 3, H, W] batch in [0, 1] with B prompts."""
    check_images(images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    low, high = images.min().item(), images.max().item()
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")


def latest_answers(reward: object) -> list[tuple[str, str, float]]:
    """(prompt, answer, score) of each image of a text-reading reward's latest call (vlm_bertscore); else []."""
    return list(getattr(reward, "answers", []))
