"""Policy adapters: text encoding, the network call with guidance, latents -> images.

Loading weights is shared with the rewards, so it lives in `pcpo_hydra.weights`, not here.

Names resolve on first access, so importing the package (as `pcpo-train --help` does) never pulls
in torch, diffusers or transformers.
"""

from __future__ import annotations

from pcpo_hydra.lazy import lazy_exports

_EXPORTS = {
    "PolicyModel": "base",
    "StableDiffusionPolicy": "stable_diffusion",
    "load_stable_diffusion": "stable_diffusion",
    "build_tiny_sd": "tiny",
    "build_tiny_sd_turbo": "tiny",
    "save_tiny_sd": "tiny",
    "SD3Policy": "sd3",
    "load_sd3": "sd3",
    "build_tiny_sd3": "tiny_sd3",
    "save_tiny_sd3": "tiny_sd3",
    "FluxPolicy": "flux",
    "load_flux": "flux",
    "build_tiny_flux": "tiny_flux",
    "save_tiny_flux": "tiny_flux",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
