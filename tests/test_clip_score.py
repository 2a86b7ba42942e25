"""CLIPScore on a tiny CLIP of the real classes, saved and loaded back through the reward's loader."""

from __future__ import annotations

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
