"""CLIPScore: how well an image matches its prompt, as CLIP's image-text cosine similarity.

Reported like torchmetrics' CLIPScore: `scale * max(cos, 0)` with scale 100 (Hessel et al. use
2.5 on ViT-B/32; set `reward.scale`). Images go through CLIP's transform as transformers' PIL image
processor runs it (the one torchmetrics and PickScore were published with), written out here on 8-bit
pixels with the sizes and normalisation of the checkpoint's preprocessor_config.json, so the score
does not depend on whether torchvision is installed (transformers then switches to another backend).

One deliberate difference from torchmetrics: a prompt over the text model's 77 tokens is cut by the
tokenizer, which keeps the end-of-text token as the 77th; torchmetrics slices the token ids, dropping
it, so CLIP pools another token's state and scores a different text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pcpo_hydra.images import to_pil, unit_float
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.weights import WeightsFor, check_source, load_component, load_error

if TYPE_CHECKING:
    from transformers import BatchEncoding, CLIPImageProcessorPil, CLIPModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLIP_LAYOUT = "a folder saved with save_pretrained holding the CLIP model, its tokenizer and image processor"
# OpenAI CLIP's normalisation, fixed in its `clip.load` transform (the checkpoints' processor configs repeat it).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
Rounding = Literal["floor", "half_even"]
Preprocessing = Literal["transformers", "openai_clip"]


def crop_start(excess: int, rounding: Rounding) -> int:
    """First kept row (column) of a centre crop that drops `excess` of them.

    The references disagree for odd excess: transformers' processor floors excess / 2; torchvision's
    CenterCrop (OpenAI CLIP's transform) rounds it, half to even, so 3 -> 2 but 1 -> 0 and 5 -> 2.
    """
    return excess // 2 if rounding == "floor" else int(round(excess / 2))


@dataclass(frozen=True)
class ClipTransform:
    """CLIP's image transform, written out so no library picks its implementation at run time.

    The 8-bit image is resized with PIL so its shorter side is `side` (the longer one truncated to
    an int, as both references compute it), centre-cropped to `crop` (height, width), scaled to
    [0, 1] and normalised per channel.
    """

    side: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rounding: Rounding
    resample: int = Image.BICUBIC

    @classmethod
    def from_processor(cls, processor: CLIPImageProcessorPil, source: str, owner: WeightsFor) -> ClipTransform:
        """The transform transformers' PIL processor runs for this preprocessor config (floored crop offset)."""
        steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        if off := [step for step in steps if not getattr(processor, step)]:
            reason = f"its image processor sets {', '.join(off)} false; CLIP's transform resizes, crops and normalises"
            raise load_error(source, None, None, reason, owner)
        side, crop = processor.size.shortest_edge, (processor.crop_size.height, processor.crop_size.width)
        if not side or max(crop) > side or abs(processor.rescale_factor * 255 - 1) > 1e-6:
            reason = (f"its image processor has shortest_edge {side}, crop_size {crop} and rescale_factor "
                      f"{processor.rescale_factor}; CLIP's transform resizes the shortest edge, crops inside it "
                      "and scales by 1/255")
            raise load_error(source, None, None, reason, owner)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        return cls(side, crop, mean, std, "floor", int(processor.resample))

    @classmethod
    def openai_clip(cls, side: int) -> ClipTransform:
        """OpenAI CLIP's `clip.load` transform for a model taking `side`-pixel inputs (torchvision's rounded crop)."""
        return cls(side, (side, side), OPENAI_MEAN, OPENAI_STD, "half_even")

    def __call__(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> pixel values [B, 3, crop_h, crop_w], float32, on the CPU."""
        return torch.stack([self.one(image) for image in to_pil(images)])

    def one(self, image: Image.Image) -> Tensor:
        """One RGB PIL image -> its normalised pixel values [3, crop_h, crop_w]."""
        width, height = image.size
        if width <= height:
            size = (self.side, int(self.side * height / width))
        else:
            size = (int(self.side * width / height), self.side)
        resized = np.asarray(image.resize(size, self.resample))
        top = crop_start(resized.shape[0] - self.crop[0], self.rounding)
        left = crop_start(resized.shape[1] - self.crop[1], self.rounding)
        cropped = unit_float(resized[top : top + self.crop[0], left : left + self.crop[1]])
        normalised = (cropped - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(normalised).permute(2, 0, 1)


class ClipEmbedder:
    """A CLIP checkpoint (model, tokenizer, image transform) turning images and prompts into unit vectors.

    Fine-tuned CLIPs often ship without their tokenizer and image processor (PickScore takes them
    from the base model's repository): `processor` names that other source, `processor_owner` its
    config key. `model` passes a CLIP already built from another checkpoint format (HPS); then only
    the tokenizer and image processor come from `pretrained`. `preprocessing` names the published
    transform to reproduce: "transformers" (the processor config, as its PIL processor runs it) or
    "openai_clip" (OpenAI's `clip.load` transform at the model's input size).
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None,
        device: str,
        dtype: str,
        owner: WeightsFor,
        processor: str | None = None,
        processor_owner: WeightsFor | None = None,
        model: CLIPModel | None = None,
        preprocessing: Preprocessing = "transformers",
    ) -> None:
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        check_source(pretrained, revision, owner)
        # The revision pins `pretrained`; a separate processor source is read from its default branch.
        source, source_revision, source_owner = (pretrained, revision, owner)
        if processor is not None:
            source, source_revision, source_owner = processor, None, processor_owner or owner
            check_source(source, None, source_owner)
        self.tokenizer = load_component(CLIPTokenizer, source, "", source_revision, source_owner)
        # The PIL class by name: `CLIPImageProcessor` is torchvision's when that is installed. Only its
        # parsed config is used; the transform itself is ClipTransform.
        self.processor = load_component(CLIPImageProcessorPil, source, "", source_revision, source_owner)
        if model is None:
            model = load_component(CLIPModel, pretrained, "", revision, owner)
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        if preprocessing == "openai_clip":
            self.transform = ClipTransform.openai_clip(model.config.vision_config.image_size)
        else:
            self.transform = ClipTransform.from_processor(self.processor, source, source_owner)

    def preprocess(self, images: Tensor) -> Tensor:
        """The checkpoint's image transform: pixel values [B, 3, S, S], float32, on the CPU."""
        return self.transform(images)

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit-norm projected image embeddings [B, D] in float32."""
        pixels = self.preprocess(images).to(self.model.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def tokenize(self, prompts: list[str]) -> BatchEncoding:
        """Token ids and attention mask; the tokenizer cuts a long prompt at 77 tokens, keeping end-of-text last."""
        return self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")

    def embed_prompts(self, prompts: list[str]) -> Tensor:
        """Unit-norm projected text embeddings [B, D] in float32."""
        pooled = self.model.text_model(**self.tokenize(prompts).to(self.model.device)).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)


class ClipScore(BaseReward):
    """`scale * max(cos(image embedding, text embedding), 0)` of a CLIP model (hub id or local dir)."""

    name = "clipscore"

    def __init__(
        self,
        pretrained: str = "openai/clip-vit-base-patch32",
        revision: str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
        scale: float = 100.0,
    ) -> None:
        super().__init__(batch_size)
        owner = WeightsFor(f"reward {self.name!r}", "reward.pretrained", CLIP_LAYOUT)
        self.clip = ClipEmbedder(pretrained, revision, device, dtype, owner)
        self.scale = float(scale)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cosine = (self.clip.embed_images(images) * self.clip.embed_prompts(prompts)).sum(-1)
        return self.scale * cosine.clamp(min=0)
