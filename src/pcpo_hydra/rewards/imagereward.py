"""ImageReward v1.0 (Xu et al. 2023): how much people prefer an image for its prompt, learned from 137k rankings.

The published model (THUDM/ImageReward) is BLIP: a ViT-L/16 encodes the image at 224 px, BLIP's
BERT encoder reads the prompt with cross-attention to every image token in every layer, and an MLP
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) maps the [CLS] output to a score, which is
standardised with the mean and std of ImageReward's training scores. The `image-reward` package
pins timm 0.6 and its BLIP code predates transformers 5, so the same network is rebuilt here from
transformers' BlipVisionModel and BlipTextModel, with ImageReward.pt's keys renamed onto them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pcpo_hydra.images import to_pil, unit_float
from pcpo_hydra.rewards.aesthetic import AestheticHead
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.clip_score import DTYPES
from pcpo_hydra.weights import (
    WeightsFor, check_source, load_component, load_error, read_state_dict, weight_file,
)

if TYPE_CHECKING:
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

# ImageReward.score: (mlp(cls) - mean) / std, with these constants from the published ImageReward.py.
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35  # prompts padded and cut to 35 tokens, as ImageReward tokenises them
PIXEL_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)  # CLIP's, which ImageReward uses
PIXEL_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
VIT_HEAD_WIDTH = 64  # BLIP's ViTs split 768 into 12 and 1024 into 16 heads; shapes do not say so
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT; transformers' BlipVisionConfig defaults to 1e-5

VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
# In the checkpoint, not used to score: BLIP's contrastive projections, and BERT's position-id buffer.
UNUSED_KEYS = frozenset({
    "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
})
# BLIP's timm-style ViT names -> BlipVisionModel's (the text encoder's names already agree).
VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"encoder.layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)
# The BERT fields of med_config.json that shape the text encoder; BlipTextConfig's defaults differ (8 heads).
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id",
)

CHECKPOINT_LAYOUT = "ImageReward.pt, the state dict with blip.visual_encoder.*, blip.text_encoder.* and mlp.layers.*"
MED_CONFIG_LAYOUT = "BLIP's med_config.json, the BERT config of the text encoder"
TOKENIZER_LAYOUT = "a folder saved with save_pretrained holding the bert-base-uncased tokenizer"


def vision_key(key: str) -> str:
    """A key under blip.visual_encoder. in BlipVisionModel's naming (unknown keys pass through unchanged)."""
    for pattern, replacement in VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def split_checkpoint(state: dict[str, Tensor], source: str, owner: WeightsFor) -> dict[str, dict[str, Tensor]]:
    """ImageReward.pt's tensors for the vision model, the text model and the head, in their own names."""
    parts: dict[str, dict[str, Tensor]] = {VISION: {}, TEXT: {}, HEAD: {}}
    strays = []
    for key, value in state.items():
        if key in UNUSED_KEYS:
            continue
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            strays.append(key)
            continue
        name = key[len(prefix):]
        parts[prefix][vision_key(name) if prefix == VISION else name] = value
    if strays:
        raise load_error(source, None, None, f"not an ImageReward checkpoint: unknown keys {sorted(strays)[:4]}", owner)
    return parts


def fill(module: nn.Module, state: dict[str, Tensor], part: str, source: str, owner: WeightsFor) -> None:
    """Load every parameter of `module` from `state` and use every tensor in it, or raise naming what differs."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        reason = f"the {part} does not match: missing {missing[:4]}, unexpected {unexpected[:4]}"
        raise load_error(source, None, None, reason, owner)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # shape mismatches
        raise load_error(source, None, None, f"the {part} does not match: {error}".replace("\n", " "), owner) from None


def vision_config(state: dict[str, Tensor], source: str, owner: WeightsFor) -> BlipVisionConfig:
    """The ViT's sizes, read from its tensors (ViT-L/16 at 224 px for the published checkpoint)."""
    from transformers import BlipVisionConfig

    try:
        width = state["embeddings.class_embedding"].shape[-1]
        patch = state["embeddings.patch_embedding.weight"].shape[-1]
        grid = math.isqrt(state["embeddings.position_embedding"].shape[1] - 1)
        intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise load_error(source, None, None, f"the vision encoder has no {error.args[0]}", owner) from None
    if width % VIT_HEAD_WIDTH:
        raise load_error(source, None, None, f"a {width}-wide ViT has no {VIT_HEAD_WIDTH}-wide heads", owner)
    layers = {key.split(".")[2] for key in state if key.startswith("encoder.layers.")}
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=intermediate, num_hidden_layers=len(layers),
        num_attention_heads=width // VIT_HEAD_WIDTH, image_size=grid * patch, patch_size=patch,
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def text_config(path: Path, source: str, vision_width: int, owner: WeightsFor) -> BlipTextConfig:
    """BLIP's BERT from med_config.json, cross-attending (in every layer) to `vision_width`-wide image tokens."""
    from transformers import BlipTextConfig

    try:
        med = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise load_error(source, None, None, f"unreadable med_config: {error}", owner) from None
    absent = [field for field in TEXT_FIELDS if field not in med]
    if absent:
        raise load_error(source, None, None, f"med_config has no {absent}", owner)
    # BLIP overrides med_config's encoder_width with the ViT's width; is_decoder builds the cross-attention.
    # The encoder never generates, so it needs no [DEC] / [SEP] ids (BlipTextConfig's defaults assume 30524 words).
    return BlipTextConfig(
        **{field: med[field] for field in TEXT_FIELDS}, encoder_hidden_size=vision_width, is_decoder=True,
        bos_token_id=None, sep_token_id=None,
    )


def blip_tokenizer(source: str, vocab_size: int, owner: WeightsFor) -> BertTokenizer:
    """bert-base-uncased plus the [DEC] and [ENC] tokens BLIP adds, which make its 30524-word vocabulary."""
    from transformers import BertTokenizer

    check_source(source, None, owner)
    tokenizer = load_component(BertTokenizer, source, "", None, owner)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        reason = f"the tokenizer has {len(tokenizer)} tokens with [DEC] and [ENC], the text encoder {vocab_size}"
        raise load_error(source, None, None, reason, owner)
    return tokenizer


def preprocess(images: Tensor, size: int) -> Tensor:
    """ImageReward's torchvision transform on 8-bit PIL images: pixel values [B, 3, size, size] on the CPU.

    Resize(size, bicubic) scales the short side to `size` (the long one to int(size * long / short)),
    CenterCrop(size) starts at round((side - size) / 2), then ToTensor and CLIP's Normalize.
    """
    crops = []
    for image in to_pil(images):
        width, height = image.size
        long = int(size * max(height, width) / min(height, width))  # torchvision's expression, to the same float
        new_height, new_width = (size, long) if height <= width else (long, size)
        resized = unit_float(np.asarray(image.resize((new_width, new_height), Image.BICUBIC)))
        top, left = round((new_height - size) / 2), round((new_width - size) / 2)
        crops.append((resized[top:top + size, left:left + size] - PIXEL_MEAN) / PIXEL_STD)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


class ImageReward(BaseReward):
    """ImageReward v1.0's standardised preference score of each image for its prompt."""

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward/ImageReward.pt",
        med_config: str = "THUDM/ImageReward/med_config.json",
        tokenizer: str = "bert-base-uncased",
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__(batch_size)
        kind = f"reward {self.name!r}"
        owner = WeightsFor(kind, "reward.checkpoint", CHECKPOINT_LAYOUT)
        parts = split_checkpoint(read_state_dict(weight_file(checkpoint, owner), checkpoint, owner), checkpoint, owner)
        self.vision = BlipVisionModel(vision_config(parts[VISION], checkpoint, owner))
        fill(self.vision, parts[VISION], "vision encoder", checkpoint, owner)
        med_owner = WeightsFor(kind, "reward.med_config", MED_CONFIG_LAYOUT)
        width = self.vision.config.hidden_size
        self.text = BlipTextModel(text_config(weight_file(med_config, med_owner), med_config, width, med_owner),
                                  add_pooling_layer=False)
        fill(self.text, parts[TEXT], "text encoder", checkpoint, owner)
        self.head = AestheticHead(self.text.config.hidden_size)  # the same MLP, layer for layer
        fill(self.head, parts[HEAD], "MLP head", checkpoint, owner)
        tokenizer_owner = WeightsFor(kind, "reward.tokenizer", TOKENIZER_LAYOUT)
        self.tokenizer = blip_tokenizer(tokenizer, self.text.config.vocab_size, tokenizer_owner)
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        for module in (self.vision, self.text):
            module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.head.to(self.device).eval().requires_grad_(False)  # float32, as ImageReward runs it on .float()

    def preprocess(self, images: Tensor) -> Tensor:
        """Pixel values [B, 3, S, S] at the checkpoint's image size (224), float32, on the CPU."""
        return preprocess(images, self.vision.config.image_size)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """Input ids and attention mask [B, 35]: [CLS] prompt [SEP] padded, as ImageReward.score (no [ENC])."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        return {key: tokens[key].to(self.device) for key in ("input_ids", "attention_mask")}

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images).to(self.device, self.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        # Every image token is attended (ImageReward's all-ones encoder mask, which is the default).
        text = self.text(**self.tokenize(prompts), encoder_hidden_states=image_tokens).last_hidden_state
        return (self.head(text[:, 0].float()) - SCORE_MEAN) / SCORE_STD
