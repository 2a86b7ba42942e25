"""DDIM with stochasticity eta (DDPO's sampler), expressed as per-step Gaussian coefficients."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from pcpo_hydra.samplers.base import BaseSampler, Index, compute_dtype


class DDIMSampler(BaseSampler):
    """x_{t_prev} = sqrt(alpha_prev/alpha_t) x_t + b(sigma) eps + sigma z on a diffusers DDIM schedule.

    The timesteps are those of `scheduler.set_timesteps(num_steps)` (run on a copy, so the
    caller's scheduler keeps its state; steps_offset and timestep_spacing are honoured), and
    t_prev = t - num_train_timesteps // num_steps as in diffusers' own step.
    """

    # BaseSampler's default_credit_mode (reweight) holds here too, though the paper used variance mode
    # for DDIM: variance mode shrinks the early steps' stds, so rollouts explore less where the image
    # is decided, and it trained slower here (docs/design.md, "Credit weights";
    # benchmarks/results/paper_claims.md). Variance stays one override away.

    def __init__(self, scheduler: Any, num_steps: int, eta: float = 1.0) -> None:
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {eta}")
        super().__init__(num_steps)
        schedule = copy.deepcopy(scheduler)
        schedule.set_timesteps(num_steps)
        self.eta = float(eta)
        self.num_train_timesteps = int(schedule.config.num_train_timesteps)
        self._timesteps = schedule.timesteps.to(torch.long).cpu()
        self._gap = self.num_train_timesteps // num_steps
        alphas = schedule.alphas_cumprod.to(torch.float64).cpu()
        prev = self._timesteps - self._gap
        final = torch.as_tensor(schedule.final_alpha_cumprod, dtype=torch.float64)
        self._alpha = alphas[self._timesteps]
        self._alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
        self._timesteps_on: dict[torch.device, Tensor] = {}

    def coefficients_at(self, i: int, s: Tensor) -> tuple[Tensor, Tensor]:
        """DDIM's x0 estimate and eps direction, folded into coefficients of x and eps.

        a = sqrt(alpha_prev/alpha_t), b = sqrt(1 - alpha_prev - s^2) - sqrt(alpha_prev (1 - alpha_t)/alpha_t).
        """
        at, ap = self._alpha[i], self._alpha_prev[i]
        a = (ap / at).sqrt()
        # The clamp only absorbs rounding at the upper std bound, where the direction term is 0.
        direction = (1 - ap - s**2).clamp(min=0).sqrt()
        b = direction - (ap * (1 - at) / at).sqrt()
        return a, b

    def native_std(self, i: int) -> Tensor:
        """sigma_t = eta sqrt((1 - alpha_prev)/(1 - alpha_t)) sqrt(1 - alpha_t/alpha_prev)."""
        at, ap = self._alpha[i], self._alpha_prev[i]
        return self.eta * ((1 - ap) / (1 - at)).sqrt() * (1 - at / ap).sqrt()

    def std_bounds(self, i: int) -> tuple[float, float]:
        """(0, sqrt(1 - alpha_prev)]: beyond it the eps direction term would be imaginary."""
        return 0.0, float((1 - self._alpha_prev[i]).sqrt())

    def interval(self, i: int) -> float:
        """(t - t_prev) / num_train_timesteps: DDIM's steps are equal gaps of the training time."""
        return self._gap / self.num_train_timesteps

    def clean_estimate(self, i: int, x: Tensor, f: Tensor) -> Tensor:
        """DDIM's x0 = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t), eps the (guided) network output."""
        at = self._alpha[i].to(device=x.device, dtype=compute_dtype(x.dtype))
        return (x.to(at.dtype) - (1 - at).sqrt() * f.to(at.dtype)) / at.sqrt()

    def timestep(self, i: Index) -> Tensor:
        """The integer training timestep t of step i (a LongTensor, on i's device for a tensor i)."""
        if not isinstance(i, Tensor):
            return self._timesteps[i]
        if i.device not in self._timesteps_on:
            self._timesteps_on[i.device] = self._timesteps.to(i.device)
        return self._timesteps_on[i.device][i]


def build_ddim_sampler(model: Any, num_steps: int, eta: float) -> DDIMSampler:
    """Hydra target of conf/sampler/ddim.yaml: a DDIM sampler on the model's own scheduler."""
    return DDIMSampler(model.scheduler, num_steps, eta)
