"""VLM-as-judge: a VLM rates each image against its prompt on a numeric scale, and the rating is the reward.

The question comes from a template holding the prompt and the scale's ends; the reward is the first
number in the VLM's answer. An answer with no number, or one outside [low, high], gives NaN: the
loop leaves such a sample out of the update and counts it (rollout/reward_nonfinite), as any
failed reward, and the run goes on.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from pcpo_hydra.rewards.vlm import VLMReward

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_rating(answer: str, low: float, high: float) -> float:
    """The first number in `answer` if it lies in [low, high], else NaN."""
    found = NUMBER.search(answer)
    if found is None:
        return float("nan")
    value = float(found.group())
    return value if low <= value <= high else float("nan")


class VLMJudge(VLMReward):
    """The rating in [low, high] a VLM gives each image when asked `template` (which holds {prompt}, {low}, {high})."""

    name = "vlm_judge"

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        revision: str | None = None,
        template: str = ('How well does this image match the description "{prompt}"? Rate it from {low} '
                         "(not at all) to {high} (perfectly). Answer with the number only."),
        low: int = 1,
        high: int = 10,
        max_new_tokens: int = 8,
        jpeg_quality: int | None = None,
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        if not low < high:
            raise ValueError(f"reward.low={low} must be below reward.high={high}")
        super().__init__(pretrained, revision, max_new_tokens, jpeg_quality, batch_size, device, dtype)
        self.template, self.low, self.high = template, low, high

    def question(self, prompt: str) -> str:
        return self.template.format(prompt=prompt, low=self.low, high=self.high)

    def rate(self, prompts: list[str], answers: list[str]) -> Tensor:
        return torch.tensor([parse_rating(answer, self.low, self.high) for answer in answers])
