"""CLIPScore: how well an image matches its prompt, as CLIP's image-text cosine similarity.

Reported like torchmetrics' CLIPScore: `scale * max(cos, 0)` with scale 100 (Hessel et al. use
2.5 on ViT-B/32; set `reward.scale`). Images go through the checkpoint's own image processor
(resize, centre crop, normalisation from its preprocessor_config.json), on 8-bit pixels as CLIP
saw them in training, so the score equals what the released model gives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pcpo_hydra.image_grid import to_uint8
from pcpo_hydra.models.loading import WeightsFor, check_source, load_component
from pcpo_hydra.rewards.base import BaseReward

if TYPE_CHECKING:
    from transformers import CLIPModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLIP_LAYOUT = "a folder saved with save_pretrained holding the CLIP model, its tokenizer and image processor"


class ClipEmbedder:
    """A CLIP checkpoint (model, tokenizer, image processor) turning images and prompts into unit vectors.

    Fine-tuned CLIPs often ship without their tokenizer and image processor (PickScore takes them
    from the base model's repository): `processor` names that other source, `processor_owner` its
    config key. `model` passes a CLIP already built from another checkpoint format (HPS); then only
    the tokenizer and image processor come from `pretrained`.
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
    ) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        check_source(pretrained, revision, owner)
        # The revision pins `pretrained`; a separate processor source is read from its default branch.
        source, source_revision, source_owner = (pretrained, revision, owner)
        if processor is not None:
            source, source_revision, source_owner = processor, None, processor_owner or owner
            check_source(source, None, source_owner)
        self.tokenizer = load_component(CLIPTokenizer, source, "", source_revision, source_owner)
        self.processor = load_component(CLIPImageProcessor, source, "", source_revision, source_owner)
        if model is None:
            model = load_component(CLIPModel, pretrained, "", revision, owner)
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """The checkpoint's image transform: pixel values [B, 3, S, S], float32, on the CPU."""
        return self.processor(images=list(to_uint8(images)), return_tensors="pt").pixel_values

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit-norm projected image embeddings [B, D] in float32."""
        pixels = self.preprocess(images).to(self.model.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def embed_prompts(self, prompts: list[str]) -> Tensor:
        """Unit-norm projected text embeddings [B, D] in float32; prompts cut at CLIP's 77 tokens."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        pooled = self.model.text_model(**tokens).pooler_output
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
