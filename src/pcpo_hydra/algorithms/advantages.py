"""Advantages from rewards: group-relative (GRPO) or per-prompt running statistics (DDPO), and their estimators."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (group std + eps), per sample.

    Groups are consecutive blocks of `group_size` samples (one prompt each). The std is the
    population std (divide by n), as the GRPO image-model references use. A NaN or inf reward
    (a failed reward call) is left out of its group's statistics and gets advantage 0, so it
    neither trains nor distorts its siblings; a group with one finite reward gets all zeros.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of rollout.group_size={group_size}"
        )
    r = rewards.reshape(-1, group_size)
    finite = torch.isfinite(r)
    count = finite.sum(1, keepdim=True).clamp(min=1)
    centred = torch.where(finite, r, 0.0)
    centred = torch.where(finite, centred - centred.sum(1, keepdim=True) / count, 0.0)
    std = ((centred**2).sum(1, keepdim=True) / count).sqrt()
    return (centred / (std + eps)).reshape(-1)


def flat_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Tensor[G] bool: the groups (consecutive blocks of `group_size`) whose finite rewards all equal.

    `group_advantages` gives such a group zero advantage, up to the rounding of its mean (so does a
    group with fewer than two finite rewards): its update would train nothing. Equality is exact,
    not within a tolerance: rewards have no common scale, and normalisation by (std + 1e-4) turns any
    spread above rounding into advantages that train. Flat groups are what discrete or saturated
    rewards (OCR accuracy, a met or missed check) produce; continuous rewards rarely tie.
    """
    r = rewards.reshape(-1, group_size)
    finite = torch.isfinite(r)
    high = torch.where(finite, r, -torch.inf).amax(1)
    low = torch.where(finite, r, torch.inf).amin(1)
    return (finite.sum(1) < 2) | (high == low)


def clip_advantages(adv: Tensor, max_abs: float) -> Tensor:
    """Clamp to [-max_abs, max_abs], bounding any one sample's push on the policy."""
    if max_abs <= 0:
        raise ValueError(f"algorithm.adv_clip_max must be > 0, got {max_abs}")
    return adv.clamp(-max_abs, max_abs)


class PerPromptStatTracker:
    """DDPO's running per-prompt reward statistics over the last `buffer_size` rewards.

    A prompt seen fewer than `min_count` times is normalised by the current batch's statistics
    instead, since a handful of its own rewards would give a noisy std. Stds are population stds.
    """

    def __init__(self, buffer_size: int, min_count: int, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Record the rewards, then return their advantages (float64 on the CPU), in order.

        Rewards must be finite: one NaN would poison a prompt's buffer for `buffer_size` epochs.
        """
        values = rewards.detach().to("cpu", torch.float64).reshape(-1)
        if len(prompts) != values.numel():
            raise ValueError(f"{len(prompts)} prompts for {values.numel()} rewards")
        if not torch.isfinite(values).all():
            raise ValueError("PerPromptStatTracker.update needs finite rewards; filter NaN/inf first")
        advantages = torch.zeros_like(values)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([k for k, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            ref = torch.tensor(buffer, dtype=torch.float64) if len(buffer) >= self.min_count else values
            advantages[rows] = (values[rows] - ref.mean()) / (ref.std(unbiased=False) + self.eps)
        return advantages

    def state_dict(self) -> dict[str, Any]:
        """Plain Python lists, so the tracker checkpoints with anything that pickles or JSONs."""
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the buffers, trimmed to this tracker's `buffer_size` (a resumed run may change it)."""
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()
        }


class AdvantageEstimator(Protocol):
    """Rewards of the epoch -> clipped advantages, with the state a resumed run must restore."""

    def __call__(self, prompts: list[str], rewards: Tensor) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class GroupRelative:
    """GRPO: normalise each reward within its prompt's group of consecutive samples."""

    group_size: int
    clip: float

    def __call__(self, prompts: list[str], rewards: Tensor) -> Tensor:
        return clip_advantages(group_advantages(rewards, self.group_size), self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PerPrompt:
    """DDPO: normalise by running per-prompt statistics that persist across epochs."""

    def __init__(self, buffer_size: int, min_count: int, clip: float) -> None:
        self.tracker = PerPromptStatTracker(buffer_size, min_count)
        self.clip = clip

    def __call__(self, prompts: list[str], rewards: Tensor) -> Tensor:
        finite = torch.isfinite(rewards)
        advantages = torch.zeros_like(rewards)
        kept = [p for p, ok in zip(prompts, finite.tolist()) if ok]
        advantages[finite] = self.tracker.update(kept, rewards[finite]).to(rewards)
        return clip_advantages(advantages, self.clip)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)
