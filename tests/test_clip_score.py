"""CLIPScore on a tiny CLIP of the real classes, saved and loaded back through the reward's loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.models.loading import ModelLoadError
from pcpo_hydra.models.tiny import tiny_tokenizer
from pcpo_hydra.rewards.clip_score import ClipScore

SIDE = 24
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP with a character-level tokenizer and CLIP's own image transform at 24 px."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4,
                     "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": SIDE, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                       image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward(clip_dir: Path) -> ClipScore:
    return ClipScore(pretrained=str(clip_dir), batch_size=2)


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
    torch.testing.assert_close(reward.preprocess(batch), expected, rtol=0, atol=1e-5)


def test_score_is_the_scaled_clipped_cosine_of_the_released_model(reward: ClipScore, clip_dir: Path) -> None:
    batch, prompts = images(), ["a red fox", "a blue car", "zzz"]
    scores = reward(batch, prompts)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        tokens = reward.tokenizer(prompts, padding=True, return_tensors="pt")
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
    assert "reward 'clipscore'" in message and "reward.pretrained=/path/to/local/dir" in message


def test_config_option_composes_and_rejects_a_bad_dtype(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=clipscore"))
    assert cfg.reward.pretrained == "openai/clip-vit-base-patch32" and cfg.reward.device == "cpu"
    with pytest.raises(ConfigError, match="reward.dtype='float64'"):
        validate(compose_cfg("reward=clipscore", "reward.dtype=float64"))
