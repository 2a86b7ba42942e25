"""Samplers: each trainable step is one Gaussian whose coefficients the algorithms read.

Names resolve on first access, so validation can read `samplers.schemas` without torch.
"""

from __future__ import annotations

from pcpo_hydra.lazy import lazy_exports

_EXPORTS = {
    "BaseSampler": "base",
    "DDIMSampler": "ddim",
    "build_ddim_sampler": "ddim",
    **{name: "flow_sde" for name in (
        "DanceGRPOSampler", "FlowGRPOSampler", "FlowModel", "FlowSDESampler", "build_dancegrpo_sampler",
        "build_flowgrpo_sampler", "flux_shift", "flux_sigmas", "sd3_sigmas", "uniform_shifted_sigmas",
    )},
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
