"""What each reward node takes, checked before any reward model is loaded (torch-free).

A schema also declares what the machine must have (`NEEDS`, see config.needs) and, for a
reward made of rewards, which fields hold whole reward nodes (`NESTED`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import Constraint, at_least, checked, interval, one_of, positive
from pcpo_hydra.config.needs import Executable, PythonModule
from pcpo_hydra.config.registry import Nested, register
from pcpo_hydra.models.schemas import PretrainedSchema
from pcpo_hydra.rewards.health import RewardServerUp


# a text the VLM rewards fill in per image: without the prompt in it, every image would be asked the same
HOLDS_PROMPT = Constraint(lambda v: "{prompt}" in v, "a text containing {prompt}")


@register("reward", "pcpo_hydra.rewards.jpeg.JpegCompressibility",
          "pcpo_hydra.rewards.jpeg.JpegIncompressibility")
@dataclass
class JpegRewardSchema:
    _target_: str = MISSING
    batch_size: int = checked(positive())
    quality: int = checked(interval(1, 100))


@dataclass
class RewardModelSchema:
    """What every reward with a network takes: how many images a call scores, where and in what dtype."""

    batch_size: int = checked(positive())
    device: str = MISSING
    dtype: str = checked(one_of("float32", "float16", "bfloat16"))


@register("reward")
@dataclass
class ClipScoreSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.clip_score.ClipScore"
    scale: float = checked(positive())


@register("reward")
@dataclass
class AestheticSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.aesthetic.AestheticScore"
    head: str = MISSING


@register("reward")
@dataclass
class PickScoreSchema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.pickscore.PickScore"
    processor: Optional[str] = MISSING  # null: the tokenizer and image processor come from `pretrained`


@register("reward")
@dataclass
class HPSv2Schema(PretrainedSchema, RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.hpsv2.HPSv2Score"
    checkpoint: str = MISSING


@register("reward")
@dataclass
class ImageRewardSchema(RewardModelSchema):
    _target_: str = "pcpo_hydra.rewards.imagereward.ImageReward"
    checkpoint: str = MISSING
    med_config: str = MISSING
    tokenizer: str = MISSING


@register("reward")
@dataclass
class OcrSchema:
    NEEDS: ClassVar[tuple] = (  # what the machine must have (checked before anything heavy, see config.needs)
        PythonModule("pytesseract", "pip install 'pcpo-hydra[ocr]'"),
        Executable("tesseract_cmd", "tesseract", "apt-get install tesseract-ocr tesseract-ocr-eng "
                   "(conda: conda install -c conda-forge tesseract; macOS: brew install tesseract)"),
    )
    _target_: str = "pcpo_hydra.rewards.ocr.OcrReward"
    batch_size: int = checked(positive())
    lang: str = MISSING
    psm: int = checked(one_of(1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
    thresholding: str = checked(one_of("otsu", "leptonica_otsu", "sauvola"))
    min_side: int = checked(at_least(0))
    workers: int = checked(positive())
    tesseract_cmd: Optional[str] = MISSING


@register("reward")
@dataclass
class MultiRewardSchema:
    """Each component is a whole reward node, checked against its own schema (see NESTED)."""

    NESTED: ClassVar[dict[str, Nested]] = {"components": Nested("reward")}
    _target_: str = "pcpo_hydra.rewards.multi.MultiReward"
    components: Dict[str, Any] = MISSING
    weights: Dict[str, float] = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """Every component needs a weight and every weight a component."""
        if set(self.weights) != set(self.components):
            yield (f"{prefix}.weights={dict(self.weights)}: must name exactly the components "
                   f"{sorted(self.components)} of {prefix}.components")


@register("reward")
@dataclass
class RemoteRewardSchema:
    """A reward served by pcpo-reward-server (conf/reward_server.yaml)."""

    NEEDS: ClassVar[tuple] = (RewardServerUp("url", "health_wait_s"),)
    _target_: str = "pcpo_hydra.rewards.remote.RemoteReward"
    url: str = checked(Constraint(
        lambda v: v.startswith(("http://", "https://")), "an http:// or https:// URL"))
    timeout_s: float = checked(positive())
    retries: int = checked(at_least(0))
    backoff_s: float = checked(at_least(0.0))
    batch_size: int = checked(positive())
    health_wait_s: Optional[float] = checked(at_least(0.0))  # null: the server is not asked before use


@register("reward")
@dataclass
class VLMBertScoreSchema(PretrainedSchema, RewardModelSchema):
    """A VLM's answer about each image, scored by BERTScore against the prompt (rewards/vlm_bertscore.py)."""

    _target_: str = "pcpo_hydra.rewards.vlm_bertscore.VLMBertScore"
    question: str = MISSING
    reference: str = checked(HOLDS_PROMPT)
    max_new_tokens: int = checked(positive())
    jpeg_quality: Optional[int] = checked(interval(1, 100))
    bertscore_model: str = MISSING
    bertscore_layer: int = checked(at_least(0))
    score: str = checked(one_of("precision", "recall", "f1"))


@register("reward")
@dataclass
class VLMJudgeSchema(PretrainedSchema, RewardModelSchema):
    """A VLM's numeric rating of each image against its prompt (rewards/vlm_judge.py)."""

    _target_: str = "pcpo_hydra.rewards.vlm_judge.VLMJudge"
    template: str = checked(HOLDS_PROMPT)
    low: int = MISSING
    high: int = MISSING
    max_new_tokens: int = checked(positive())
    jpeg_quality: Optional[int] = checked(interval(1, 100))

    def relations(self, prefix: str) -> Iterator[str]:
        """A scale runs upwards."""
        if not self.low < self.high:
            yield f"{prefix}.low={self.low}: must be below {prefix}.high={self.high}"
