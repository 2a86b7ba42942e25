"""Clipped surrogate losses: pure functions of the (credit-scaled) log-ratio and the advantages.

Each returns (per-sample loss, outside) where `outside` marks the samples whose ratio (log-ratio)
lies outside the clip interval: the clip fraction as DDPO, DanceGRPO and Flow-GRPO log it, so
figures compare with theirs. (Only some of those samples lose their gradient: the ones where the
clipped branch is the larger.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pessimistic(adv: Tensor, value: Tensor, clipped_value: Tensor) -> tuple[Tensor, Tensor]:
    """max(-A v, -A clip(v)): the PPO pessimistic bound, with where v lies outside the interval."""
    return torch.maximum(-adv * value, -adv * clipped_value), value != clipped_value


def ratio_objective(log_r: Tensor, adv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """GRPO/PPO: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with rho = exp(log_r)."""
    rho = torch.exp(log_r)
    return _pessimistic(adv, rho, rho.clamp(1 - eps, 1 + eps))


def log_hinge_objective(log_r: Tensor, adv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PCPO: max(-A r, -A clip(r, -eps, eps)); linear in the log-ratio, so no exp amplifies it."""
    return _pessimistic(adv, log_r, log_r.clamp(-eps, eps))
