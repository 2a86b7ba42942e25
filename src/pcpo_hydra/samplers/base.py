"""`BaseSampler`: a sampler step as one Gaussian, x' = a x + b f + s z, written once for every family.

Subclasses describe a step only through its coefficients (`coefficients_at`, `native_std`,
`std_bounds`, `interval`, `timestep`); the Gaussian step, its log-density and its credit weight
live here, so DDIM and the flow SDE samplers cannot drift apart in how they use them.

Step indices `i` are either a Python int (one step for the whole batch, as in rollouts) or a
LongTensor[B] (one step per sample, as in the update's shuffled timesteps).

A sampler may carry an SDE window (`windowed`): then only the window's steps draw noise, and
every other step is its deterministic limit, std 0 (DDIM at eta 0, the flow ODE's Euler step).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

Index = int | Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision latents are promoted: log-densities of 16-bit values lose the signal."""
    return torch.promote_types(dtype, torch.float32)


def mean_over_sample(t: Tensor) -> Tensor:
    """Mean over every non-batch element, so clip ranges keep one meaning across resolutions."""
    return t.flatten(1).mean(1)


class BaseSampler(ABC):
    """Per-step Gaussian coefficients plus the step, log-prob and credit weight derived from them.

    Coefficient tables are float64 (on the CPU); `step` and `log_prob` evaluate in float32, or in
    float64 when the latents are float64.
    """

    default_credit_mode: str = "reweight"  # how PCPO realises proportional credit for this family

    def __init__(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self._std_override: Tensor | None = None
        self.window: tuple[int, int] | None = None  # (first step, size) of the SDE window; None: all steps
        self._reset_cache()

    # ---- what a sampler family provides -------------------------------------------------------

    @abstractmethod
    def coefficients_at(self, i: int, s: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) of step i when its std is s (float64); elementwise in s, so a grid of stds works too."""

    @abstractmethod
    def native_std(self, i: int) -> Tensor:
        """The std the family's reference sampler uses at step i (float64, 0-d)."""

    @abstractmethod
    def std_bounds(self, i: int) -> tuple[float, float]:
        """(lo, hi): the stds step i admits; lo is exclusive when it is 0."""

    @abstractmethod
    def interval(self, i: int) -> float:
        """Length of step i's integration interval, what proportional credit is proportional to."""

    @abstractmethod
    def timestep(self, i: Index) -> Tensor:
        """The time value the network is conditioned on at step i."""

    def clean_estimate(self, i: int, x: Tensor, f: Tensor) -> Tensor:
        """The clean sample x0 the network output f predicts from x at step i (in x's compute dtype).

        What a one-step sampler would return from x, and what SDPO scores at every step
        (algorithms/sdpo.py). A family that cannot tell says so here rather than guessing.
        """
        raise NotImplementedError(f"{type(self).__name__} has no clean-sample estimate")

    # ---- derived, shared by every family -----------------------------------------------------

    def with_stds(self, stds: Tensor) -> BaseSampler:
        """A copy that samples step i with std stds[i]; its a and b follow through `coefficients_at`."""
        stds = torch.as_tensor(stds, dtype=torch.float64).cpu()
        if stds.shape != (self.num_steps,):
            raise ValueError(f"with_stds needs {self.num_steps} stds, got shape {tuple(stds.shape)}")
        for i, s in enumerate(stds.tolist()):
            lo, hi = self.std_bounds(i)
            if not (lo < s <= hi * (1 + 1e-12)):
                raise ValueError(f"std {s} of step {i} is outside its admissible range ({lo}, {hi}]")
        other = copy.copy(self)
        other._std_override = stds
        other._reset_cache()
        return other

    def deterministic(self) -> BaseSampler:
        """A copy whose every step has std 0: DDIM at eta 0, the flow ODE's Euler step.

        Sampling only (pcpo-sample): a zero-std step has no log-density, so `log_prob` refuses it.
        The std bounds are not checked here, since 0 is below every step's (open) lower end.
        """
        other = copy.copy(self)
        other._std_override = torch.zeros(self.num_steps, dtype=torch.float64)
        other._reset_cache()
        return other

    def windowed(self, first: int, size: int) -> BaseSampler:
        """A copy that draws noise only on steps [first, first + size), deterministic (std 0) elsewhere.

        The window's steps keep this sampler's own stds, so they are the same Gaussians as in a
        full-SDE rollout; only they have a log-density and a credit weight.
        """
        if not (size >= 1 and 0 <= first and first + size <= self.num_steps):
            raise ValueError(f"an SDE window of {size} steps from step {first} does not fit in {self.num_steps} steps")
        other = copy.copy(self)
        other.window = (first, size)
        other._reset_cache()
        return other

    def noisy_steps(self) -> range:
        """The steps that draw noise, and so are stored and trained: the SDE window's, else all."""
        if self.window is None:
            return range(self.num_steps)
        first, size = self.window
        return range(first, first + size)

    def stds(self) -> Tensor:
        """Tensor[T] float64: the std each step samples with (override, else native)."""
        return self._table()[2].clone()

    def intervals(self) -> Tensor:
        """Tensor[T] float64 of the steps' integration intervals."""
        return torch.tensor([self.interval(i) for i in range(self.num_steps)], dtype=torch.float64)

    def weight_at(self, i: int, s: Tensor) -> Tensor:
        """Credit weight |b(s)| / s^2 of step i for a candidate std (or grid of stds) s."""
        _, b = self.coefficients_at(i, s)
        return b.abs() / s**2

    def native_weights(self) -> Tensor:
        """Tensor[T] float64: w_t = |b_t| / s_t^2 with the stds this sampler samples with."""
        self._require_noise(torch.arange(self.num_steps))
        _, b, s = self._table()
        return b.abs() / s**2

    def coefficients(self, i: Index) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, s) of step i as float64: 0-d for an int i, [B] (on i's device) for a tensor i."""
        device = i.device if isinstance(i, Tensor) else torch.device("cpu")
        a, b, s = self._table_on(device, torch.float64)
        return a[i], b[i], s[i]

    def coefficients_for(self, i: Index, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, s) on `like`'s device in its compute dtype, shaped to broadcast against it."""
        table = self._table_on(like.device, compute_dtype(like.dtype))
        if isinstance(i, Tensor):
            shape = (-1,) + (1,) * (like.dim() - 1)
            i = i.to(like.device)
            return tuple(row[i].reshape(shape) for row in table)
        return tuple(row[i] for row in table)

    def step(self, i: Index, x: Tensor, f: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(prev, mean, std): mean = a x + b f, prev = mean + std * noise; prev and mean in x's dtype."""
        mean, s = self._mean(i, x, f)
        prev = mean + s * noise.to(mean.dtype)
        return prev.to(x.dtype), mean.to(x.dtype), s

    def log_prob(self, i: Index, x: Tensor, f: Tensor, prev: Tensor) -> Tensor:
        """Tensor[B] in x's compute dtype: the Gaussian log-density of prev, per element, averaged."""
        self._require_noise(i)
        mean, s = self._mean(i, x, f)
        quadratic = mean_over_sample((prev.to(mean.dtype) - mean) ** 2 / (2 * s**2))
        # The -log s - log sqrt(2 pi) terms are constant per sample: added after the mean.
        return -quadratic - torch.log(s).reshape(-1) - _LOG_SQRT_2PI

    # ---- internals ----------------------------------------------------------------------------

    def _mean(self, i: Index, x: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        """(a x + b f, s) in x's compute dtype."""
        a, b, s = self.coefficients_for(i, x)
        return a * x.to(a.dtype) + b * f.to(a.dtype), s

    def _reset_cache(self) -> None:
        self._cached_table: Tensor | None = None
        self._zero_std_steps: frozenset[int] = frozenset()
        self._converted: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _table(self) -> Tensor:
        """[3, T] float64 rows a, b, s, built once from the family's per-step coefficients."""
        if self._cached_table is None:
            rows = []
            noisy = self.noisy_steps()
            for i in range(self.num_steps):
                s = self._std_override[i] if self._std_override is not None else self.native_std(i)
                s = torch.as_tensor(s if i in noisy else 0.0, dtype=torch.float64)
                a, b = self.coefficients_at(i, s)
                rows.append(torch.stack([a, b, s]))
            self._cached_table = torch.stack(rows, 1)
            self._zero_std_steps = frozenset((self._cached_table[2] == 0).nonzero().flatten().tolist())
        return self._cached_table

    def _table_on(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The coefficient table converted once per device and dtype (the update calls it per step)."""
        key = (device, dtype)
        if key not in self._converted:
            self._converted[key] = self._table().to(device=device, dtype=dtype)
        return self._converted[key]

    def _require_noise(self, i: Index) -> None:
        """A step with std 0 is deterministic: it has no density and no credit weight."""
        self._table()
        if not self._zero_std_steps:
            return
        asked = set(torch.as_tensor(i).flatten().tolist())
        if self._zero_std_steps & asked:
            where = (f"outside the SDE window {list(self.noisy_steps())}" if self.window is not None
                     else "deterministic, e.g. eta=0")
            raise ValueError(
                f"steps {sorted(self._zero_std_steps & asked)} have std 0 ({where}): their log-prob and "
                "credit weight are undefined"
            )


def instantiate_sampler(node: DictConfig, model: Any) -> BaseSampler:
    """A sampler node built on `model`: its `sde_window` is the training loop's schedule, not a constructor's key."""
    from hydra.utils import instantiate

    options = OmegaConf.to_container(node, resolve=True)
    options.pop("sde_window", None)
    return instantiate(options, model=model)
