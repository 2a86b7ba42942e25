"""`PolicyGradient`: the per-step clipped policy-gradient loss, with every PCPO switch as a plain arg."""

from __future__ import annotations

import torch
from torch import Tensor

from pcpo_hydra.algorithms.advantages import clip_advantages
from pcpo_hydra.algorithms.credit import credit_plan
from pcpo_hydra.algorithms.log_ratio import direct_log_ratio, matching_log_ratio
from pcpo_hydra.algorithms.objectives import log_hinge_objective, ratio_objective
from pcpo_hydra.samplers.base import BaseSampler, Index, compute_dtype, mean_over_sample

_OBJECTIVES = {"ratio": ratio_objective, "log_hinge": log_hinge_objective}


def _choose(name: str, value: object, options: tuple[object, ...]) -> None:
    """Reject a misspelt switch at construction, naming the override to fix."""
    if value not in options:
        raise ValueError(f"algorithm.{name} must be one of {options}, got {value!r}")


def gaussian_kl(b: Tensor, s: Tensor, f_new: Tensor, f_ref: Tensor) -> Tensor:
    """Tensor[B]: KL(pi_theta || pi_ref) of one step, ||mu_theta - mu_ref||^2 / (2 s^2), averaged.

    The two Gaussians share x, a and s, so their means differ by b (f_new - f_ref) alone; averaged
    over elements like the log-prob (Flow-GRPO's kl_loss), so beta keeps its meaning across sizes.
    """
    dtype = compute_dtype(f_new.dtype)
    gap = (b.to(dtype) / s.to(dtype)) * (f_new.to(dtype) - f_ref.to(dtype))
    return mean_over_sample(gap**2) / 2


class PolicyGradient:
    """GRPO is (ratio, direct, native); PCPO is (log_hinge, matching, proportional).

    `credit_mode=None` defers to the sampler family's `default_credit_mode`. Call `prepare` once
    with the configured sampler; roll out and update with the sampler it returns. `kl_beta` > 0 adds
    Flow-GRPO's KL penalty to the reference policy; the caller then passes the reference's output.
    """

    def __init__(
        self,
        objective: str,
        log_ratio: str,
        credit: str,
        credit_mode: str | None,
        clip_range: float,
        adv_clip_max: float,
        kl_beta: float = 0.0,
    ) -> None:
        _choose("objective", objective, tuple(_OBJECTIVES))
        _choose("log_ratio", log_ratio, ("direct", "matching"))
        _choose("credit", credit, ("native", "proportional"))
        _choose("credit_mode", credit_mode, ("variance", "reweight", None))
        if clip_range <= 0:
            raise ValueError(f"algorithm.clip_range must be > 0, got {clip_range}")
        if kl_beta < 0:
            raise ValueError(f"algorithm.kl_beta must be >= 0, got {kl_beta}")
        self.objective = objective
        self.log_ratio = log_ratio
        self.credit = credit
        self.credit_mode = credit_mode
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.kl_beta = kl_beta
        self.scales: Tensor | None = None
        self._scales_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def prepare(self, sampler: BaseSampler) -> BaseSampler:
        """Fix the per-step credit scales; returns the sampler to use for rollouts and updates.

        An epoch with an SDE window rolls out and updates with the window's copy of the returned
        sampler and keeps these scales: each step's credit per unit of its interval is then the
        same whichever window it falls in (docs/design.md, "SDE windows").
        """
        mode = self.credit_mode or sampler.default_credit_mode
        rollout, self.scales = credit_plan(sampler, self.credit, mode)
        self._scales_on = {}
        return rollout

    def step_loss(
        self,
        i: Index,
        sampler: BaseSampler,
        x: Tensor,
        prev: Tensor,
        noise: Tensor,
        f_old: Tensor,
        f_new: Tensor,
        log_prob_old: Tensor,
        advantages: Tensor,
        f_ref: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(batch-mean loss, detached stats) at step(s) i; `f_ref` is the reference's output when kl_beta > 0.

        Stats: policy_loss, approx_kl, clipfrac, log_ratio_abs, and kl_loss with the penalty on.
        """
        log_rho = self._log_ratio(i, sampler, x, prev, noise, f_old, f_new, log_prob_old)
        r = self._scale(i, log_rho) * log_rho
        adv = clip_advantages(advantages, self.adv_clip_max).to(r.dtype)
        policy_loss, outside = _OBJECTIVES[self.objective](r, adv, self.clip_range)
        policy_loss = policy_loss.mean()
        loss = policy_loss
        with torch.no_grad():
            stats = {
                "policy_loss": policy_loss.detach(),
                "approx_kl": 0.5 * (log_rho**2).mean(),
                "clipfrac": outside.to(log_rho.dtype).mean(),
                "log_ratio_abs": log_rho.abs().mean(),
            }
        if self.kl_beta:
            if f_ref is None:
                raise ValueError("algorithm.kl_beta > 0 needs the reference policy's output f_ref")
            kl = gaussian_kl(*sampler.coefficients_for(i, f_new)[1:], f_new, f_ref).mean()
            loss = loss + self.kl_beta * kl
            stats["kl_loss"] = kl.detach()
        return loss, stats

    def _log_ratio(
        self, i: Index, sampler: BaseSampler, x: Tensor, prev: Tensor, noise: Tensor,
        f_old: Tensor, f_new: Tensor, log_prob_old: Tensor,
    ) -> Tensor:
        """Tensor[B] log(pi_new / pi_old) by the configured route."""
        if self.log_ratio == "direct":
            return direct_log_ratio(sampler.log_prob(i, x, f_new, prev), log_prob_old)
        _, b, s = sampler.coefficients_for(i, f_new)
        return matching_log_ratio(b, s, noise, f_new, f_old)

    def _scale(self, i: Index, like: Tensor) -> Tensor:
        """Credit scale of step(s) i on `like`'s device and dtype, converted once per pair."""
        if self.scales is None:
            raise RuntimeError("PolicyGradient.prepare(sampler) must run before step_loss")
        key = (like.device, like.dtype)
        if key not in self._scales_on:
            self._scales_on[key] = self.scales.to(device=like.device, dtype=like.dtype)
        return self._scales_on[key][i.to(like.device) if isinstance(i, Tensor) else i]
