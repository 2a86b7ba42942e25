"""What each sampler node takes, checked before any model is built (torch-free).

`FAMILY` is the network output a sampler steps: epsilon (diffusion) or velocity (flow).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import checked, interval, one_of, positive
from pcpo_hydra.config.registry import register
from pcpo_hydra.samplers.window import PLACEMENTS


@dataclass
class SDEWindowSchema:
    """conf/sampler/sde_window/full.yaml: the window of stochastic, trained steps (samplers/window.py)."""

    size: Optional[int] = checked(positive())
    placement: str = checked(one_of(*PLACEMENTS))
    range: Optional[list[int]] = MISSING
    every: int = checked(positive())
    stride: int = checked(positive())


@dataclass
class SamplerSchema:
    """What every sampler node has: its step count and its SDE window, checked against each other."""

    num_steps: int = checked(positive())
    # conf/sampler/sde_window/full.yaml (size null: no window); a run saved before windows existed
    # gets it on resume (config/resume.py)
    sde_window: Optional[SDEWindowSchema] = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """The window must fit in its range, and the range in the sampler's steps."""
        window, key = self.sde_window, f"{prefix}.sde_window"
        if window is None:
            return
        if window.size is None:
            if window.placement in ("random", "sliding"):
                yield f"{key}.placement={window.placement!r}: places no window while {key}.size is null; set {key}.size"
            return
        if window.range is not None and not (len(window.range) == 2 and 0 <= window.range[0] < window.range[1]
                                             <= self.num_steps):
            yield (f"{key}.range={list(window.range)}: must be [first, end) with 0 <= first < end <= "
                   f"{prefix}.num_steps={self.num_steps}")
            return
        first, end = window.range or (0, self.num_steps)
        if window.size > end - first:
            yield (f"{key}.size={window.size}: more steps than the {end - first} of its range [{first}, {end}) "
                   f"({key}.range, {prefix}.num_steps={self.num_steps})")


@register("sampler")
@dataclass
class DDIMSamplerSchema(SamplerSchema):
    FAMILY: ClassVar[str] = "diffusion"  # the model family it steps (epsilon prediction)
    _target_: str = "pcpo_hydra.samplers.build_ddim_sampler"
    eta: float = checked(interval(0.0, 1.0, low_open=True))


@register("sampler")
@dataclass
class DanceGRPOSamplerSchema(SamplerSchema):
    FAMILY: ClassVar[str] = "flow"  # velocity prediction
    _target_: str = "pcpo_hydra.samplers.build_dancegrpo_sampler"
    eta: float = checked(positive())
    shift: Optional[float] = checked(positive())  # None: the model's own schedule


@register("sampler")
@dataclass
class FlowGRPOSamplerSchema(SamplerSchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.samplers.build_flowgrpo_sampler"
    noise_level: float = checked(positive())
