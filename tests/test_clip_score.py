"""CLIPScore on a tiny CLIP of the real classes, saved and loaded back through the reward's loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.models.loading import ModelLoadError
from pcpo_hydra.rewards.clip_score import ClipScore

from conftest import CLIP_MEAN as MEAN, CLIP_SIDE as SIDE, CLIP_STD as STD


@pytest.fixture(scope="module")
def reward(tiny_clip_dir: Path) -> ClipScore:
    return ClipScore(pretrained=str(tiny_clip_dir), batch_size=2)


def images(count: int = 3, height: int = 32, width: int = 40) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(1))


def hand_preprocessed(image: torch.Tensor) -> torch.Tensor:
    """CLIP's transform by hand: 8-bit pixels, bicubic shortest side to 24 (32x40 -> 24x30), centre crop, normalise."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    resized = np.asarray(Image.fromarray(pixels).resize((30, SIDE), Image.BICUBIC), dtype=np.float32)
    cropped = resized[:, 3:27] / 255.0
    normalised = (cropped - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)


def test_preprocessing_is_clips_resize_crop_and_normalisation(reward: ClipScore) -> None:
    batch = images()
    expected = torch.stack([hand_preprocessed(image) for image in batch])
    torch.testing.assert_close(reward.clip.preprocess(batch), expected, rtol=0, atol=1e-5)


def test_score_is_the_scaled_clipped_cosine_of_the_released_model(reward: ClipScore, tiny_clip_dir: Path) -> None:
    batch, prompts = images(), ["a red fox", "a blue car", "zzz"]
    scores = reward(batch, prompts)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        tokens = reward.clip.tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        pixels = torch.stack([hand_preprocessed(image) for image in batch])
        vision = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(vision, text, dim=-1)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), rtol=1e-4, atol=1e-4)
    assert torch.equal(reward(batch, prompts), scores)  # deterministic, and batching (2 + 1) is invisible


def test_missing_weights_name_the_reward_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        ClipScore(pretrained=str(tmp_path / "no_clip"))
    message = str(error.value)
    assert "reward 'clipscore'" in message and "reward.pretrained=<local path>" in message


def test_config_option_composes_and_rejects_a_bad_dtype(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=clipscore"))
    assert cfg.reward.pretrained == "openai/clip-vit-base-patch32" and cfg.reward.device == "cpu"
    with pytest.raises(ConfigError, match="reward.dtype='float64'"):
        validate(compose_cfg("reward=clipscore", "reward.dtype=float64"))


# Colour words and the token that ends each one in the tiny character-level vocabulary ("red" -> "d</w>").
COLOURS = {"red": ((1.0, 0.0, 0.0), "d</w>"), "green": ((0.0, 1.0, 0.0), "n</w>"), "blue": ((0.0, 0.0, 1.0), "e</w>")}


def colour_clip(folder: Path) -> CLIPModel:
    """The tiny CLIP with hand-set weights under which colour c of an image and the c-th colour word share axis c.

    All weights zero except: the patch conv averages channel c into hidden unit c; the word's final
    token embeds as unit c; each block attends uniformly (q, k zero) and passes values on (v, out =
    identity) with a zero MLP, so the pooled token carries the mean of the patches / tokens; every
    LayerNorm scales by 1; the projections keep units 0-2. Matching pairs then point the same way.
    """
    from transformers import CLIPTokenizer

    model = CLIPModel.from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        for tower in (model.vision_model, model.text_model):
            for layer in tower.encoder.layers:
                identity = torch.eye(layer.self_attn.v_proj.weight.shape[0])
                layer.self_attn.v_proj.weight.copy_(identity)
                layer.self_attn.out_proj.weight.copy_(identity)
        patch = model.vision_model.embeddings.patch_embedding.weight
        tokens = model.text_model.embeddings.token_embedding.weight
        for axis, (_, token) in enumerate(COLOURS.values()):
            patch[axis, axis] = 1.0 / patch[axis, axis].numel()
            tokens[tokenizer.convert_tokens_to_ids(token), axis] = 1.0
            model.visual_projection.weight[axis, axis] = 1.0
            model.text_projection.weight[axis, axis] = 1.0
    return model


def colour_pairs(side: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Every flat colour image with every colour word: row i of the [3, 3] result is image i."""
    flat = torch.tensor([rgb for rgb, _ in COLOURS.values()])[:, :, None, None].expand(3, 3, side, side)
    return flat.repeat_interleave(3, dim=0), list(COLOURS) * 3


def test_a_matching_prompt_scores_above_a_mismatched_one(tiny_clip_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_clip_dir, tmp_path, dirs_exist_ok=True)  # its tokenizer and image processor
    colour_clip(tiny_clip_dir).save_pretrained(tmp_path)
    images, prompts = colour_pairs()
    scores = ClipScore(pretrained=str(tmp_path))(images, prompts).view(3, 3)
    assert torch.equal(scores.argmax(dim=1), torch.arange(3))
    assert (scores.diagonal() > 60).all()
    assert (scores[~torch.eye(3, dtype=torch.bool)] == 0).all()  # negative cosines clip to 0
