"""Flow-matching SDE samplers (DanceGRPO, Flow-GRPO) and the sigma schedules they run on.

A flow model predicts the velocity v of x_sigma = (1 - sigma) x0 + sigma x1 (x1 the noise, sigma
running 1 -> 0). Both reference samplers take one Euler-Maruyama step of the same reverse-time SDE
per schedule interval and differ only in the noise each step injects. Written as functions of the
step's std s (so PCPO's variance mode can move s), with d = sigma_{i+1} - sigma_i < 0:

    a(s) = 1 - s^2 / (2 sigma_i),    b(s) = d - s^2 (1 - sigma_i) / (2 sigma_i)

DanceGRPO's a and b follow by eta^2 = s^2 / (-d), Flow-GRPO's by std^2 = s^2 / (-d); the
per-family formulas of docs/design.md ("The three samplers' coefficients") are these at each
family's native s. The credit weight is then
|b| / s^2 = -d / s^2 + (1 - sigma_i) / (2 sigma_i), falling monotonically in s.

Where the schedule comes from: a flow model adapter implements `FlowModel.flow_sigmas(num_steps)`,
returning the T+1 sigmas its own diffusers pipeline samples with at the configured resolution
(SD3: `sd3_sigmas`, FLUX: `flux_sigmas`); the builders below ask it, and reject a model without it.

What the network is conditioned on: `timestep(i)` is sigma_i * 1000, the value diffusers'
FlowMatchEulerDiscreteScheduler keeps in `timesteps` and SD3's pipeline hands its transformer.
FLUX's pipeline hands its transformer timestep / 1000 = sigma; that division belongs in the FLUX
adapter's `forward_network`, as it does in diffusers, so every sampler speaks the scheduler's units.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from pcpo_hydra.samplers.base import BaseSampler, Index, compute_dtype

TIMESTEP_SCALE = 1000.0  # num_train_timesteps of SD3 and FLUX: scheduler timestep = sigma * 1000


@runtime_checkable
class FlowModel(Protocol):
    """What a flow sampler needs from the model: the schedule its own pipeline samples with."""

    def flow_sigmas(self, num_steps: int) -> Tensor:
        """Tensor[num_steps + 1]: sigma_0 = 1 falling strictly to sigma_T = 0."""


class FlowSDESampler(BaseSampler):
    """The Euler-Maruyama step of the flow SDE on a sigma schedule; a family supplies `native_std`."""

    # BaseSampler's default_credit_mode (reweight) is the PCPO paper's choice for flow: keep the
    # reference sampler, rescale each step's log-ratio.

    def __init__(self, sigmas: Tensor) -> None:
        sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64)
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D tensor of T+1 >= 2 values, got {tuple(sigmas.shape)}")
        if not (sigmas[0] <= 1 and sigmas[-1] >= 0 and bool((sigmas.diff() < 0).all())):
            raise ValueError(f"sigmas must fall strictly from at most 1 to at least 0, got {sigmas.tolist()}")
        super().__init__(sigmas.numel() - 1)
        self.sigmas = sigmas
        self._timesteps = (sigmas[:-1] * TIMESTEP_SCALE).to(torch.float32)
        self._timesteps_on: dict[torch.device, Tensor] = {}

    def coefficients_at(self, i: int, s: Tensor) -> tuple[Tensor, Tensor]:
        """a(s) = 1 - s^2/(2 sigma_i), b(s) = d - s^2 (1 - sigma_i)/(2 sigma_i), d = sigma_{i+1} - sigma_i.

        The drift's score term -(x + (1 - sigma) v)/sigma, scaled by the step's variance s^2 / 2,
        folded into the coefficients of x and v.
        """
        sigma, d = self.sigmas[i], self.sigmas[i + 1] - self.sigmas[i]
        half_var = s**2 / (2 * sigma)
        return 1 - half_var, d - half_var * (1 - sigma)

    def std_bounds(self, i: int) -> tuple[float, float]:
        """(0, hi]: up to the std at which the step stops denoising, or the native std if larger.

        Every s > 0 gives a proper Gaussian, so validity alone sets no upper end, yet PCPO's
        variance search needs one: the weight only approaches (1 - sigma_i)/(2 sigma_i) as s grows,
        and an unreachable target would drive s as high as allowed. With the exact velocity
        x1 - x0, the mean is (1 - sigma_{i+1}) x0 + (sigma_{i+1} - s^2/(2 sigma_i)) x1 for every s,
        so the step leaves noise of variance (sigma_{i+1} - s^2/(2 sigma_i))^2 + s^2; it equals
        sigma_i^2 (the step undoes itself) at s^2 = 2 sigma_i (sqrt(2 sigma_i |d|) - |d|). The
        reference samplers can inject more (Flow-GRPO's first step at noise_level 0.7, DanceGRPO's
        last on a schedule ending near 0), so their own std stays admissible.
        """
        sigma, gap = float(self.sigmas[i]), self.interval(i)
        no_progress = math.sqrt(2 * sigma * (math.sqrt(2 * sigma * gap) - gap))
        return 0.0, max(no_progress, float(self.native_std(i)))

    def interval(self, i: int) -> float:
        """|sigma_{i+1} - sigma_i|: flow schedules are uneven, so PCPO's credit follows it."""
        return float(self.sigmas[i] - self.sigmas[i + 1])

    def clean_estimate(self, i: int, x: Tensor, f: Tensor) -> Tensor:
        """x0 = x - sigma_i v: the point the velocity v reaches at sigma 0 from x_sigma."""
        dtype = compute_dtype(x.dtype)
        return x.to(dtype) - float(self.sigmas[i]) * f.to(dtype)

    def timestep(self, i: Index) -> Tensor:
        """sigma_i * 1000 as float32, the scheduler's timestep (on i's device for a tensor i)."""
        if not isinstance(i, Tensor):
            return self._timesteps[i]
        if i.device not in self._timesteps_on:
            self._timesteps_on[i.device] = self._timesteps.to(i.device)
        return self._timesteps_on[i.device][i]


class DanceGRPOSampler(FlowSDESampler):
    """DanceGRPO's SDE: noise eta^2 per unit of sigma, s = eta sqrt(sigma_i - sigma_{i+1})."""

    def __init__(self, sigmas: Tensor, eta: float) -> None:
        if eta <= 0:
            raise ValueError(f"sampler.eta must be > 0 (a stochastic step), got {eta}")
        super().__init__(sigmas)
        self.eta = float(eta)

    def native_std(self, i: int) -> Tensor:
        """eta sqrt(-d)."""
        return self.eta * (self.sigmas[i] - self.sigmas[i + 1]).sqrt()


class FlowGRPOSampler(FlowSDESampler):
    """Flow-GRPO's SDE: std = noise_level sqrt(sigma_i / (1 - sigma_i')), s = std sqrt(-d).

    sigma_i' = sigma_i except at sigma_i = 1, where it is sigmas[1] (the reference's way to keep
    the first step's std finite).
    """

    def __init__(self, sigmas: Tensor, noise_level: float) -> None:
        if noise_level <= 0:
            raise ValueError(f"sampler.noise_level must be > 0 (a stochastic step), got {noise_level}")
        super().__init__(sigmas)
        self.noise_level = float(noise_level)

    def native_std(self, i: int) -> Tensor:
        """noise_level sqrt(sigma_i / (1 - sigma_i')) sqrt(-d)."""
        sigma = self.sigmas[i]
        guarded = self.sigmas[1] if sigma == 1 else sigma
        std = self.noise_level * (sigma / (1 - guarded)).sqrt()
        return std * (sigma - self.sigmas[i + 1]).sqrt()


# ---- schedules: what diffusers' FlowMatchEulerDiscreteScheduler produces, in float64 ----------


def _time_shift(t: Tensor, shift: float) -> Tensor:
    """shift t / (1 + (shift - 1) t): more of the steps at high noise for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def uniform_shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """Tensor[T+1]: the even grid 1 -> 0 of T+1 points, time-shifted (DanceGRPO's schedule, shift 3)."""
    return _time_shift(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift)


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    """Tensor[T+1]: `set_timesteps(num_steps)` of a statically shifted scheduler (SD3's pipeline), then 0.

    Its grid runs evenly between the largest and smallest shifted training sigma (1 and
    shift(1/N)) and is shifted once more, as diffusers does.
    """
    sigma_min = _time_shift(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
    grid = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64)
    return torch.cat([_time_shift(grid, shift), grid.new_zeros(1)])


def flux_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
    base_shift: float = 0.5, max_shift: float = 1.15,
) -> float:
    """exp(mu), mu linear in the latent token count from base_shift to max_shift (FLUX's pipeline)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (image_seq_len - base_seq_len))


def flux_sigmas(num_steps: int, image_seq_len: int, **shift_config: float) -> Tensor:
    """Tensor[T+1]: FLUX's pipeline schedule, the even grid 1 -> 1/T shifted by exp(mu), then 0.

    diffusers' exponential time shift exp(mu) / (exp(mu) + 1/t - 1) is `_time_shift` with
    shift = exp(mu); `shift_config` takes the scheduler config's base/max seq len and shift.
    """
    return uniform_shifted_sigmas(num_steps, flux_shift(image_seq_len, **shift_config))


# ---- builders (Hydra targets of conf/sampler/*.yaml) ------------------------------------------


def _flow_model(model: Any, option: str) -> FlowModel:
    """The model, if it is a flow model: a flow step on a noise (epsilon) prediction is meaningless."""
    if not isinstance(model, FlowModel):
        raise TypeError(
            f"sampler={option} needs a flow-matching model (one implementing flow_sigmas(num_steps)); "
            f"{type(model).__name__} is not one: use sampler=ddim with it, or choose a flow model"
        )
    return model


def _model_sigmas(model: FlowModel, num_steps: int) -> Tensor:
    """The model's schedule for num_steps steps, checked for length."""
    sigmas = torch.as_tensor(model.flow_sigmas(num_steps))
    if sigmas.shape != (num_steps + 1,):
        raise ValueError(f"{type(model).__name__}.flow_sigmas({num_steps}) gave shape "
                         f"{tuple(sigmas.shape)}, expected ({num_steps + 1},)")
    return sigmas


def build_dancegrpo_sampler(
    model: Any, num_steps: int, eta: float, shift: float | None = None
) -> DanceGRPOSampler:
    """Hydra target of conf/sampler/dancegrpo_sde.yaml.

    shift=None samples on the model's own schedule; a number uses DanceGRPO's reference grid
    `uniform_shifted_sigmas(num_steps, shift)` instead (its FLUX runs: shift 3).
    """
    model = _flow_model(model, "dancegrpo_sde")
    sigmas = _model_sigmas(model, num_steps) if shift is None else uniform_shifted_sigmas(num_steps, shift)
    return DanceGRPOSampler(sigmas, eta)


def build_flowgrpo_sampler(model: Any, num_steps: int, noise_level: float) -> FlowGRPOSampler:
    """Hydra target of conf/sampler/flowgrpo_sde.yaml: Flow-GRPO's SDE on the model's own schedule."""
    return FlowGRPOSampler(_model_sigmas(_flow_model(model, "flowgrpo_sde"), num_steps), noise_level)
