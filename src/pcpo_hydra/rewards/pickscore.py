"""PickScore v1 (Kirstain et al., Pick-a-Pic): CLIP-H fine-tuned on human choices between images.

The score is what PickScore's own inference code reports before its softmax:
`logit_scale.exp() * cos(image embedding, text embedding)`, the cosine times the model's learned
temperature (the logits Pick-a-Pic's preference loss was trained on). That softmax
compares several images of one prompt; here every image has its own prompt, so it is left out.
PickScore's code takes the tokenizer and image processor (resize, centre crop to 224, OpenAI CLIP
normalisation) from the base model laion/CLIP-ViT-H-14-laion2B-s32B-b79K, not from the fine-tuned
repository; `reward.processor` names that source. Its README runs them through transformers'
AutoProcessor, which then gave the PIL image processor; ClipTransform reproduces that one, so the
score stays the same where torchvision is installed (transformers now picks its torchvision backend).
"""

from __future__ import annotations

from torch import Tensor

from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.clip_score import ClipEmbedder
from pcpo_hydra.weights import WeightsFor

MODEL_LAYOUT = "a folder saved with save_pretrained holding the fine-tuned CLIPModel (config.json and weights)"
PROCESSOR_LAYOUT = "a folder holding the CLIP tokenizer and image processor (preprocessor_config.json)"


class PickScore(BaseReward):
    """`exp(logit_scale) * cos(image, prompt)` of the PickScore CLIP (model and processor: hub ids or local dirs)."""

    name = "pickscore"

    def __init__(
        self,
        pretrained: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        revision: str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        super().__init__(batch_size)
        kind = f"reward {self.name!r}"
        self.clip = ClipEmbedder(
            pretrained, revision, device, dtype, WeightsFor(kind, "reward.pretrained", MODEL_LAYOUT),
            processor=processor, processor_owner=WeightsFor(kind, "reward.processor", PROCESSOR_LAYOUT),
        )

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cosine = (self.clip.embed_images(images) * self.clip.embed_prompts(prompts)).sum(-1)
        return self.clip.model.logit_scale.float().exp() * cosine
