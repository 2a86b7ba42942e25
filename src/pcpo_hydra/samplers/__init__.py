"""Samplers: each trainable step is one Gaussian whose coefficients the algorithms read."""

from __future__ import annotations

from pcpo_hydra.samplers.base import BaseSampler
from pcpo_hydra.samplers.ddim import DDIMSampler, build_ddim_sampler
from pcpo_hydra.samplers.flow_sde import (
    DanceGRPOSampler,
    FlowGRPOSampler,
    FlowModel,
    FlowSDESampler,
    build_dancegrpo_sampler,
    build_flowgrpo_sampler,
    flux_shift,
    flux_sigmas,
    sd3_sigmas,
    uniform_shifted_sigmas,
)

__all__ = [
    "BaseSampler",
    "DDIMSampler",
    "DanceGRPOSampler",
    "FlowGRPOSampler",
    "FlowModel",
    "FlowSDESampler",
    "build_dancegrpo_sampler",
    "build_ddim_sampler",
    "build_flowgrpo_sampler",
    "flux_shift",
    "flux_sigmas",
    "sd3_sigmas",
    "uniform_shifted_sigmas",
]
