"""Log-ratio log(pi_new / pi_old) of one sampler step, by two routes with the same exact value."""

from __future__ import annotations

from torch import Tensor

from pcpo_hydra.samplers.base import compute_dtype, mean_over_sample


def direct_log_ratio(log_prob_new: Tensor, log_prob_old: Tensor) -> Tensor:
    """The baseline: difference of two log-densities, which cancels most of their digits."""
    return log_prob_new - log_prob_old


def matching_log_ratio(b: Tensor, s: Tensor, noise: Tensor, f_new: Tensor, f_old: Tensor) -> Tensor:
    """Tensor[B]: mean of (b/s) z D - (b^2 / (2 s^2)) D^2 with D = f_new - f_old.

    Both Gaussians share the std and differ in mean by b D, so the log-ratio is this quadratic in
    D exactly; it is computed from D itself, never from two large log-densities. `b` and `s` must
    broadcast against the latents (0-d, or [B, 1, ...]); z is the rollout's stored noise.
    """
    dtype = compute_dtype(f_new.dtype)
    kd = (b.to(dtype) / s.to(dtype)) * (f_new.to(dtype) - f_old.to(dtype))
    return mean_over_sample(kd * (noise.to(dtype) - 0.5 * kd))  # (b/s) z D - (b D / s)^2 / 2
