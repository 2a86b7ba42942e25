"""What each sampler node takes, checked before any model is built (torch-free).

`FAMILY` is the network output a sampler steps: epsilon (diffusion) or velocity (flow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from pcpo_hydra.config.checks import checked, interval, positive
from pcpo_hydra.config.registry import register


@register("sampler")
@dataclass
class DDIMSamplerSchema:
    FAMILY: ClassVar[str] = "diffusion"  # the model family it steps (epsilon prediction)
    _target_: str = "pcpo_hydra.samplers.build_ddim_sampler"
    num_steps: int = checked(positive())
    eta: float = checked(interval(0.0, 1.0, low_open=True))


@register("sampler")
@dataclass
class DanceGRPOSamplerSchema:
    FAMILY: ClassVar[str] = "flow"  # velocity prediction
    _target_: str = "pcpo_hydra.samplers.build_dancegrpo_sampler"
    num_steps: int = checked(positive())
    eta: float = checked(positive())
    shift: Optional[float] = checked(positive())  # None: the model's own schedule


@register("sampler")
@dataclass
class FlowGRPOSamplerSchema:
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.samplers.build_flowgrpo_sampler"
    num_steps: int = checked(positive())
    noise_level: float = checked(positive())
