"""HPS v2.1 (Wu et al., Human Preference Score v2): OpenCLIP ViT-H/14 fine-tuned on human choices.

The score is HPSv2's own: the cosine of the normalised image and text embeddings (no logit scale,
unlike PickScore). HPSv2 ships an open_clip state dict; open_clip needs torchvision, whose PyPI
build does not load with CPU torch, and OpenCLIP's ViT-H-14 is the same network (pre-norm blocks,
GELU) as transformers' CLIPModel of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. So that repository gives
the architecture, tokenizer (the same BPE, after HPSv2's own prompt clean-up) and normalisation,
and the checkpoint's keys are renamed into it. Images go through HPSv2's validation transform: the
longer side resized to 224 (bicubic with antialiasing, on float pixels), the shorter one padded
with black to a centred square, then CLIP's normalisation.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import Tensor

from pcpo_hydra.images import from_uint8, to_uint8
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.clip_score import ClipEmbedder
from pcpo_hydra.weights import (
    WeightsFor, check_source, load_component, load_error, read_state_dict, weight_file,
)

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

ARCHITECTURE_LAYOUT = "a CLIP folder from save_pretrained: config.json, tokenizer, image processor (weights unused)"
CHECKPOINT_LAYOUT = "HPSv2's open_clip checkpoint, e.g. HPS_v2.1_compressed.pt"
CHECKPOINT_EXAMPLES = 5  # keys quoted in a mismatch error

# open_clip (OpenAI naming) -> transformers CLIPModel, for keys outside the transformer blocks.
RENAMED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
    **{
        f"{norm}.{param}": f"{ours}.{param}"
        for norm, ours in (
            ("visual.ln_pre", "vision_model.pre_layrnorm"),
            ("visual.ln_post", "vision_model.post_layernorm"),
            ("ln_final", "text_model.final_layer_norm"),
        )
        for param in ("weight", "bias")
    },
}
# open_clip multiplies `features @ proj`; a bias-free Linear stores the transpose.
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # q, k, v stacked in one tensor
BLOCK_PARTS = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def convert_open_clip(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """An open_clip CLIP state dict in transformers' CLIPModel naming, and the keys it does not know.

    nn.MultiheadAttention keeps q, k and v stacked in one `in_proj` (in that order); CLIPAttention
    has three Linears, so the stack is split in three.
    """
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        block = BLOCK.fullmatch(key)
        if key in RENAMED:
            converted[RENAMED[key]] = value
        elif key in TRANSPOSED:
            converted[TRANSPOSED[key]] = value.T
        elif block is None:
            unknown.append(key)
        else:
            tower, index, rest = block.groups()
            prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{index}."
            part, _, param = rest.rpartition(".")
            if rest in IN_PROJ:
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    converted[f"{prefix}self_attn.{name}.{IN_PROJ[rest]}"] = chunk
            elif part in BLOCK_PARTS and param in ("weight", "bias"):
                converted[f"{prefix}{BLOCK_PARTS[part]}.{param}"] = value
            else:
                unknown.append(key)
    return converted, unknown


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:CHECKPOINT_EXAMPLES])
    return shown + (f" and {len(keys) - CHECKPOINT_EXAMPLES} more" if len(keys) > CHECKPOINT_EXAMPLES else "")


def load_open_clip(config: CLIPConfig, path: Path, owner: WeightsFor) -> CLIPModel:
    """A CLIPModel of `config` holding an open_clip checkpoint; every key used, every parameter filled."""
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    converted, unknown = convert_open_clip(
        {key.removeprefix("module."): value  # DDP's prefix
         for key, value in read_state_dict(path, str(path), owner, nested="state_dict").items()}
    )
    with no_init_weights():  # every parameter is overwritten below; random init of ViT-H takes a while
        model = CLIPModel(config)
    expected = model.state_dict()
    unknown += sorted(set(converted) - set(expected))  # e.g. a block beyond the config's depth
    problems = []
    if unknown:
        problems.append(f"keys with no place in the configured CLIP: {_listed(unknown)}")
    if missing := sorted(set(expected) - set(converted)):
        problems.append(f"no weights for {_listed(missing)}")
    if wrong := [f"{key} {tuple(value.shape)} (config: {tuple(expected[key].shape)})"
                 for key, value in converted.items() if key in expected and value.shape != expected[key].shape]:
        problems.append(f"shapes differ: {_listed(wrong)}")
    if problems:
        reason = f"not an open_clip checkpoint of this CLIP: {'; '.join(problems)}"
        raise load_error(str(path), None, None, reason, owner)
    model.load_state_dict(converted, strict=True)
    return model


def fit_longer_side(images: Tensor, side: int) -> Tensor:
    """HPSv2's validation transform before normalisation: [B, 3, side, side] floats, the image centred on black.

    HPSv2 (its open_clip copy's image_transform with resize_longest_max, i.e. ResizeMaxSize) turns
    the 8-bit image into a float tensor first, then resizes that tensor with torchvision, which
    HPSv2 does not pin: current torchvision resizes tensors with antialiasing on by default, and
    that is what `F.interpolate(..., antialias=True)` below is (torchvision calls it, without
    clamping floats). Written in torch so the pixels are the same with or without torchvision.
    ResizeMaxSize leaves an image whose longer side is already `side` alone, unpadded, which only
    works when it is square; it is padded here either way.
    """
    pixels = from_uint8(to_uint8(images))  # ToTensor of the 8-bit image
    height, width = pixels.shape[-2:]
    scale = side / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)  # Python's round, as ResizeMaxSize's
    if (new_height, new_width) != (height, width):
        pixels = F.interpolate(pixels, size=(new_height, new_width), mode="bicubic", align_corners=False,
                               antialias=True)
    top, left = (side - new_height) // 2, (side - new_width) // 2  # the smaller half of the padding first
    return F.pad(pixels, (left, side - new_width - left, top, side - new_height - top))


def clean_prompt(prompt: str) -> str:
    """HPSv2's tokenizer clean-up: ftfy's repairs (mojibake, odd unicode), HTML unescaped twice, whitespace collapsed.

    transformers' CLIP tokenizer only collapses whitespace and lowercases, so `&amp;` or `cafÃ©`
    would reach the BPE as they are. `regex` (a transformers dependency) as open_clip uses it: its \\s is Unicode's White_Space, not str.isspace.
    """
    return regex.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()).strip()


class PaddedClipEmbedder(ClipEmbedder):
    """A CLIP whose images are fitted into the square input and whose prompts are cleaned, as HPSv2 does."""

    def preprocess(self, images: Tensor) -> Tensor:
        """Longer side to the model's input size (bicubic with antialiasing, on floats), centred on black, normalised."""
        canvas = fit_longer_side(images, self.model.config.vision_config.image_size)
        mean = torch.tensor(self.processor.image_mean).view(3, 1, 1)
        std = torch.tensor(self.processor.image_std).view(3, 1, 1)
        return (canvas - mean) / std

    def embed_prompts(self, prompts: list[str]) -> Tensor:
        return super().embed_prompts([clean_prompt(prompt) for prompt in prompts])


class HPSv2Score(BaseReward):
    """cos(image, prompt) of the HPS-tuned ViT-H/14: architecture from `pretrained`, weights from `checkpoint`."""

    name = "hpsv2"

    def __init__(
        self,
        pretrained: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        checkpoint: str = "xswu/HPSv2/HPS_v2.1_compressed.pt",
        revision: str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        from transformers import CLIPConfig

        super().__init__(batch_size)
        kind = f"reward {self.name!r}"
        owner = WeightsFor(kind, "reward.pretrained", ARCHITECTURE_LAYOUT)
        checkpoint_owner = WeightsFor(kind, "reward.checkpoint", CHECKPOINT_LAYOUT)
        check_source(pretrained, revision, owner)
        config = load_component(CLIPConfig, pretrained, "", revision, owner)
        model = load_open_clip(config, weight_file(checkpoint, checkpoint_owner), checkpoint_owner)
        self.clip = PaddedClipEmbedder(pretrained, revision, device, dtype, owner, model=model)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.clip.embed_images(images) * self.clip.embed_prompts(prompts)).sum(-1)
