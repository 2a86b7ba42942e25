"""PickScore on a tiny CLIP of the real classes: the model in one folder, tokenizer and processor in another."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.rewards.pickscore import PickScore
from pcpo_hydra.weights import ModelLoadError

from conftest import run_reference
from test_clip_score import as_images, colour_clip, colour_pairs, hand_preprocessed, images, read_scores, write_images

TEMPERATURE = 37.0  # exp(logit_scale) set in the tiny model, so a missing or doubled exp shows


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fine-tuned model alone, as PickScore's repository serves it (no tokenizer, no image processor)."""
    folder = tmp_path_factory.mktemp("pickscore")
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(TEMPERATURE))
    model.save_pretrained(folder)
    return folder


def test_score_is_exp_logit_scale_times_the_cosine(model_dir: Path, tiny_clip_dir: Path) -> None:
    reward = PickScore(pretrained=str(model_dir), processor=str(tiny_clip_dir), batch_size=2)
    batch, prompts = images(), ["a red fox", "a blue car", "zzz"]
    scores = reward(batch, prompts)
    model = CLIPModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        tokens = reward.clip.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
        pixels = torch.stack([hand_preprocessed(image) for image in batch])
        vision = model.get_image_features(pixel_values=pixels).pooler_output
    cosine = torch.nn.functional.cosine_similarity(vision, text, dim=-1)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, TEMPERATURE * cosine, rtol=1e-4, atol=1e-4)
    # No softmax across the batch: each score stands alone, so a batch of 3 in one call or 2 + 1 agree.
    one_call = PickScore(pretrained=str(model_dir), processor=str(tiny_clip_dir), batch_size=3)(batch, prompts)
    torch.testing.assert_close(one_call, scores, rtol=0, atol=1e-5)
    assert torch.equal(reward(batch, prompts), scores)


def test_processor_null_reads_everything_from_pretrained(tiny_clip_dir: Path) -> None:
    batch, prompts = images(2), ["a", "b"]
    same_folder = PickScore(pretrained=str(tiny_clip_dir), processor=None)
    split = PickScore(pretrained=str(tiny_clip_dir), processor=str(tiny_clip_dir))
    assert torch.equal(same_folder(batch, prompts), split(batch, prompts))


def test_a_matching_prompt_scores_above_a_mismatched_one(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = colour_clip(tiny_clip_dir)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(TEMPERATURE))
    model.save_pretrained(tmp_path)
    batch, prompts = colour_pairs()
    scores = PickScore(pretrained=str(tmp_path), processor=str(tiny_clip_dir))(batch, prompts).view(3, 3)
    assert torch.equal(scores.argmax(dim=1), torch.arange(3))
    # Cosines of about +0.7 for matching pairs and -0.5 for the others, times the temperature.
    assert (scores.diagonal() > 0.6 * TEMPERATURE).all()
    assert (scores[~torch.eye(3, dtype=torch.bool)] < -0.4 * TEMPERATURE).all()


def test_missing_model_or_processor_names_its_own_key(model_dir: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"reward 'pickscore'.*reward\.pretrained=<local path>"):
        PickScore(pretrained=str(tmp_path / "no_model"), processor=str(tiny_clip_dir))
    with pytest.raises(ModelLoadError, match=r"reward 'pickscore'.*reward\.processor=<local path>"):
        PickScore(pretrained=str(model_dir), processor=str(tmp_path / "no_processor"))
    # A model-only folder has no image processor: without reward.processor that is an error, not a guess.
    with pytest.raises(ModelLoadError, match=r"reward\.pretrained=<local path>"):
        PickScore(pretrained=str(model_dir), processor=None)
    # A processor folder without the model weights, passed as the model, fails on reward.pretrained.
    no_weights = tmp_path / "processor_only"
    shutil.copytree(tiny_clip_dir, no_weights)
    for weights in no_weights.glob("model*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match=r"reward\.pretrained=<local path>"):
        PickScore(pretrained=str(no_weights), processor=str(tiny_clip_dir))


def test_config_option_composes_and_rejects_a_bad_dtype(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=pickscore"))
    assert cfg.reward.pretrained == "yuvalkirstain/PickScore_v1"
    assert cfg.reward.processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" and cfg.reward.device == "cpu"
    with pytest.raises(ConfigError, match="reward.dtype='float64'"):
        validate(compose_cfg("reward=pickscore", "reward.dtype=float64"))


@pytest.mark.integration
def test_scores_equal_pickscores_readme_code(model_dir: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    """The README's AutoProcessor + AutoModel scoring on the PIL processor it ran with, vs ours, to 1e-4."""
    generator = np.random.default_rng(6)
    # 32 x 36 resizes to 24 x 27, where the processors' crop offsets and resizes differ; 31 x 50 to 24 x 38.
    batches = [generator.integers(0, 256, (3, 32, 36, 3), dtype=np.uint8),
               generator.integers(0, 256, (2, 50, 31, 3), dtype=np.uint8)]
    prompts = [["a red fox", "a blue car", "zzz"], ["a", "two cats on a mat"]]
    images = write_images(tmp_path, batches, prompts)
    run_reference("clip", "pickscore_readme.py", str(model_dir), str(tiny_clip_dir), images,
                  str(tmp_path / "prompts.json"), str(tmp_path / "readme.npz"))
    readme = read_scores(tmp_path / "readme.npz", len(batches))
    reward = PickScore(pretrained=str(model_dir), processor=str(tiny_clip_dir))
    for batch, batch_prompts, expected in zip(batches, prompts, readme):
        torch.testing.assert_close(reward(as_images(batch), batch_prompts).double(), expected, rtol=1e-4, atol=0)
    # transformers' default processor where torchvision is installed is not the README's: it fails this comparison.
    default = read_scores(tmp_path / "readme.npz", len(batches), prefix="torchvision")
    assert not all(torch.allclose(theirs, expected, rtol=1e-4, atol=0) for theirs, expected in zip(default, readme))
