"""What each model node takes, checked before any model is built (torch-free).

`FAMILY` says what the network predicts; validation pairs a model only with a sampler of the
same family. `PretrainedSchema` is shared with the rewards that load weights too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import at_least, checked, positive
from pcpo_hydra.config.registry import register


@dataclass
class LoraSchema:
    """`model.lora`: LoRA adapters on a frozen base; also the settings models.trainable attaches them by."""

    enabled: bool = MISSING
    rank: int = checked(positive())
    alpha: float = checked(positive())
    target_modules: list[str] = MISSING


@dataclass
class PretrainedSchema:
    """Weights from a hub id or a local folder (models and rewards alike)."""

    pretrained: str = MISSING
    revision: Optional[str] = MISSING


@dataclass
class PolicySchema:
    """What every model node takes: guidance, what trains, and whether text encoders leave the device."""

    guidance_scale: float = checked(at_least(1.0))
    offload_text_encoders: bool = MISSING  # embed all prompts once (text cache), then unload the encoders
    lora: LoraSchema = MISSING


@dataclass
class PretrainedPolicySchema(PretrainedSchema, PolicySchema):
    resolution: int = checked(positive())
    gradient_checkpointing: bool = MISSING


@dataclass
class TinyPolicySchema(PolicySchema):
    seed: int = MISSING  # torch.manual_seed takes any int (the run's seed, bounded below, is what numpy sees)
    resolution: int = checked(positive())


@register("model")
@dataclass
class StableDiffusionSchema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "diffusion"  # what the network predicts; a sampler must be of the same family
    _target_: str = "pcpo_hydra.models.stable_diffusion.load_stable_diffusion"


@register("model")
@dataclass
class TinyStableDiffusionSchema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "diffusion"
    _target_: str = "pcpo_hydra.models.tiny.build_tiny_sd"


@register("model")
@dataclass
class TinySDTurboSchema(TinyStableDiffusionSchema):
    """tiny_sd_turbo: the tiny SD's keys; its target differs only in schedule and guidance default."""

    _target_: str = "pcpo_hydra.models.tiny.build_tiny_sd_turbo"


@register("model")
@dataclass
class SD3Schema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "flow"  # velocity prediction
    _target_: str = "pcpo_hydra.models.sd3.load_sd3"
    max_sequence_length: int = checked(positive())  # T5 tokens


@register("model")
@dataclass
class TinySD3Schema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.tiny_sd3.build_tiny_sd3"


@register("model")
@dataclass
class FluxSchema(PretrainedPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.flux.load_flux"
    guidance: float = checked(at_least(0.0))  # the distilled guidance FLUX.1-dev embeds
    max_sequence_length: int = checked(positive())  # T5 tokens


@register("model")
@dataclass
class TinyFluxSchema(TinyPolicySchema):
    FAMILY: ClassVar[str] = "flow"
    _target_: str = "pcpo_hydra.models.tiny_flux.build_tiny_flux"
    guidance: float = checked(at_least(0.0))
