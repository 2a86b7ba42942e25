"""Samplers: each trainable step is one Gaussian whose coefficients the algorithms read."""

from __future__ import annotations

from pcpo_hydra.samplers.base import BaseSampler
from pcpo_hydra.samplers.ddim import DDIMSampler, build_ddim_sampler

__all__ = ["BaseSampler", "DDIMSampler", "build_ddim_sampler"]
