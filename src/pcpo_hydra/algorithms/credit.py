"""Proportional credit: make each step's effective weight proportional to its integration interval.

A step's native credit weight is w_t = |b_t| / s_t^2 (how strongly its log-ratio responds to a
change of the network output). PCPO's target w~_t is proportional to the step's interval and has
the same mean as w, so the average step size matches the baseline. It is realised either by
rescaling the log-ratio (reweight) or by changing the sampler's stds so that w itself moves
towards w~ (variance), with a residual rescale closing whatever gap remains. This normalisation
is our derivation; the paper's equations are not available to us.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pcpo_hydra.samplers.base import BaseSampler

_GRID_POINTS = 4097        # log-spaced candidate stds per step, to find every crossing
_GRID_DECADES = 8          # the grid spans [hi * 1e-8, hi] when the lower bound is 0
_BISECTIONS = 200          # float64 searches stop early once their bracket cannot shrink


def proportional_weights(native: Tensor, intervals: Tensor) -> Tensor:
    """w~ = c * interval with c such that mean(w~) = mean(native)."""
    intervals = intervals.to(torch.float64)
    return intervals * (native.to(torch.float64).mean() / intervals.mean())


def reweight_scales(sampler: BaseSampler) -> Tensor:
    """Tensor[T] float64: w~_t / w_t, the factor on each step's log-ratio (reweight mode)."""
    native = sampler.native_weights()
    return proportional_weights(native, sampler.intervals()) / native


def _log_gap(sampler: BaseSampler, i: int, s: float | Tensor, target: float) -> Tensor:
    """log w_i(s) - log target: zero where the std s gives exactly the target weight."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return torch.log(sampler.weight_at(i, s)) - math.log(target)


def _bisect(sampler: BaseSampler, i: int, lo: float, hi: float, target: float) -> float:
    """A root of the log gap in [lo, hi], given that its sign differs at the two ends."""
    sign_lo = torch.sign(_log_gap(sampler, i, lo, target))
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        sign_mid = torch.sign(_log_gap(sampler, i, mid, target))
        if sign_mid == 0:
            return mid
        if sign_mid == sign_lo:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _refine_closest(sampler: BaseSampler, i: int, lo: float, hi: float, target: float) -> float:
    """Golden-section search for the least |log gap| in [lo, hi], a bracket around a grid minimum."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def distance(s: float) -> float:
        return abs(float(_log_gap(sampler, i, s, target)))

    for _ in range(_BISECTIONS):
        left, right = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if not lo < left < right < hi:
            break
        if distance(left) < distance(right):
            hi = right
        else:
            lo = left
    return 0.5 * (lo + hi)


def _matching_std(sampler: BaseSampler, i: int, target: float, native: float) -> float:
    """The admissible std of step i whose weight is closest to `target`.

    A dense log-spaced grid finds every crossing (bisection refines each); of several, the one
    nearest the native std wins. Without a crossing, the grid's point of least log-gap is
    refined between its neighbours.
    """
    lo, hi = sampler.std_bounds(i)
    start = lo if lo > 0 else hi * 10.0**-_GRID_DECADES
    grid = torch.logspace(math.log10(start), math.log10(hi), _GRID_POINTS, dtype=torch.float64)
    grid[-1] = hi
    gap = _log_gap(sampler, i, grid, target)
    sign = torch.sign(gap)
    brackets = ((sign[:-1] * sign[1:]) <= 0).nonzero().flatten().tolist()
    if not brackets:
        k = int(torch.nan_to_num(gap.abs(), nan=math.inf).argmin())
        left, right = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, _GRID_POINTS - 1)])
        return _refine_closest(sampler, i, left, right, target)
    roots = [_bisect(sampler, i, float(grid[k]), float(grid[k + 1]), target) for k in brackets]
    return min(roots, key=lambda root: abs(root - native))


def variance_stds(sampler: BaseSampler) -> tuple[Tensor, Tensor]:
    """(stds, scales), Tensor[T] float64 each: sigma~_t and the residual factor w~_t / w_t(sigma~_t)."""
    native_stds = sampler.stds()
    target = proportional_weights(sampler.native_weights(), sampler.intervals())
    stds = torch.tensor(
        [_matching_std(sampler, i, float(target[i]), float(native_stds[i]))
         for i in range(sampler.num_steps)],
        dtype=torch.float64,
    )
    achieved = torch.stack([sampler.weight_at(i, stds[i]) for i in range(sampler.num_steps)])
    return stds, target / achieved


def credit_plan(sampler: BaseSampler, credit: str, mode: str) -> tuple[BaseSampler, Tensor]:
    """(rollout sampler, per-step log-ratio scales float64) for a credit choice and its mode."""
    if credit == "native":
        return sampler, torch.ones(sampler.num_steps, dtype=torch.float64)
    if credit != "proportional":
        raise ValueError(f"algorithm.credit must be 'native' or 'proportional', got {credit!r}")
    if mode == "reweight":
        return sampler, reweight_scales(sampler)
    if mode == "variance":
        stds, scales = variance_stds(sampler)
        return sampler.with_stds(stds), scales
    raise ValueError(f"algorithm.credit_mode must be 'variance' or 'reweight', got {mode!r}")
