"""CLIPScore on a tiny CLIP of the real classes, saved and loaded back through the reward's loader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.rewards.clip_score import ClipScore
from pcpo_hydra.weights import ModelLoadError

from conftest import CLIP_MEAN as MEAN, CLIP_SIDE as SIDE, CLIP_STD as STD, run_reference


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


def test_a_processor_config_unlike_clips_transform_fails(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """The transform is ours, so a config asking for something else must not be silently ignored."""
    config = json.loads((tiny_clip_dir / "preprocessor_config.json").read_text())
    for change, reason in (({"do_center_crop": False}, "sets do_center_crop false"),
                           ({"crop_size": {"height": 32, "width": 32}}, "crop_size (32, 32)")):
        folder = tmp_path / next(iter(change))
        shutil.copytree(tiny_clip_dir, folder)
        (folder / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelLoadError, match=rf"'{folder}'.*{re.escape(reason)}.*reward\.pretrained=<local path>"):
            ClipScore(pretrained=str(folder))


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


# --- Against the authors' code, run in the `clip` reference venv (tests/reference/clip.txt) ---


def write_images(folder: Path, batches: list[np.ndarray], prompts: list[list[str]] | None = None) -> str:
    """The reference scripts' inputs: uint8 batches [B, H, W, 3] in images.npz (prompts in prompts.json); its path."""
    np.savez(folder / "images.npz", *batches)
    if prompts is not None:
        (folder / "prompts.json").write_text(json.dumps(prompts))
    return str(folder / "images.npz")


def read_scores(path: Path, count: int, prefix: str = "arr") -> list[torch.Tensor]:
    """A reference script's scores, one float64 tensor per batch."""
    with np.load(path) as arrays:
        return [torch.from_numpy(arrays[f"{prefix}_{i}"]) for i in range(count)]


def as_images(batch: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the [0, 1] floats rewards take; 8-bit again after to_uint8's rounding."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255


def copy_processor_files(source: Path, folder: Path) -> None:
    """The tokenizer and image processor of a CLIP folder, beside another folder's model."""
    for path in source.iterdir():
        if path.name != "config.json" and not path.name.startswith("model"):
            shutil.copy(path, folder / path.name)


LONG = 77  # CLIP's text length: the real models' tokenizers and position tables


@pytest.fixture(scope="module")
def clip77_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP with CLIP's 77 text positions, image and text embeddings pushed into one half-space.

    Random towers give cosines of either sign, which CLIPScore clips to 0 and would hide any difference;
    shared projections and a common LayerNorm offset keep every cosine positive and still varied.
    """
    from transformers import CLIPConfig, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip77")
    config = CLIPConfig.from_pretrained(tiny_clip_dir)
    config.text_config.max_position_embeddings = LONG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = CLIPModel(config)
    with torch.no_grad():
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.post_layernorm.bias.add_(1.0)
        model.text_model.final_layer_norm.bias.add_(1.0)
    model.save_pretrained(folder)
    copy_processor_files(tiny_clip_dir, folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = LONG
    tokenizer.save_pretrained(folder)
    return folder


# 105 letters, a token each in the tiny character vocabulary: past 77 tokens, as a long real prompt.
LONG_PROMPT = ("a watercolour painting of a quiet harbour at dawn with small fishing boats and gulls "
               "over the calm water and green hills behind")
PROMPTS = [["a red fox", LONG_PROMPT], ["zzz", "a blue car in the rain"]]


def test_a_long_prompt_is_cut_at_77_tokens_ending_in_end_of_text(clip77_dir: Path) -> None:
    """Ours keeps end-of-text as the 77th token; torchmetrics' slice of the ids ends mid-prompt."""
    reward = ClipScore(pretrained=str(clip77_dir))
    tokenizer = reward.clip.tokenizer
    ids = reward.clip.tokenize(["a red fox", LONG_PROMPT])["input_ids"]
    full = tokenizer([LONG_PROMPT])["input_ids"][0]
    assert len(full) > LONG and ids.shape == (2, LONG)
    assert ids[1, -1] == tokenizer.eos_token_id and ids[1, 0] == tokenizer.bos_token_id
    assert ids[1, :-1].tolist() == full[: LONG - 1]  # the prompt's first 75 tokens, then end-of-text
    sliced = full[:LONG]
    assert sliced[-1] != tokenizer.eos_token_id and tokenizer.eos_token_id not in sliced


def sliced_scores(reward: ClipScore, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Our CLIP fed torchmetrics' token ids: padded, untruncated, then sliced to the text positions."""
    tokens = reward.clip.tokenizer(prompts, padding=True, return_tensors="pt")
    tokens = {key: value[:, :LONG] for key, value in tokens.items()}
    text = reward.clip.model.text_projection(reward.clip.model.text_model(**tokens).pooler_output)
    cosine = (reward.clip.embed_images(images) * torch.nn.functional.normalize(text, dim=-1)).sum(-1)
    return 100 * cosine.clamp(min=0)


@pytest.mark.integration
def test_scores_equal_torchmetrics_clip_score_but_for_prompts_over_77_tokens(clip77_dir: Path, tmp_path: Path) -> None:
    generator = np.random.default_rng(8)
    batches = [generator.integers(0, 256, (2, 32, 36, 3), dtype=np.uint8),
               generator.integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)]
    images = write_images(tmp_path, batches, PROMPTS)
    run_reference("clip", "clip_torchmetrics.py", str(clip77_dir), images, str(tmp_path / "prompts.json"),
                  str(tmp_path / "torchmetrics.npz"))
    theirs = read_scores(tmp_path / "torchmetrics.npz", 2)
    reward = ClipScore(pretrained=str(clip77_dir))
    ours = [reward(as_images(batch), prompts).double() for batch, prompts in zip(batches, PROMPTS)]
    assert all((scores > 1).all() for scores in ours)  # no cosine clipped to 0: every score compares
    # Short prompts: the same score to 1e-4.
    short = [(0, 0), (1, 0), (1, 1)]
    torch.testing.assert_close(torch.stack([theirs[b][i] for b, i in short]),
                               torch.stack([ours[b][i] for b, i in short]), rtol=1e-4, atol=0)
    # The long prompt: torchmetrics' score is ours with its sliced ids, and not ours.
    torch.testing.assert_close(theirs[0][1], sliced_scores(reward, as_images(batches[0]), PROMPTS[0])[1].double(),
                               rtol=1e-4, atol=0)
    assert abs(theirs[0][1] - ours[0][1]) / ours[0][1] > 1e-2


@pytest.mark.integration
def test_scores_do_not_depend_on_torchvision(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """All three CLIP-family rewards, in a venv with torchvision importable and then blocked, and here (none)."""
    import pcpo_hydra
    from test_aesthetic import head_state
    from pcpo_hydra.rewards.aesthetic import AestheticScore
    from pcpo_hydra.rewards.pickscore import PickScore

    package = tmp_path / "package"
    shutil.copytree(Path(pcpo_hydra.__file__).parent, package / "pcpo_hydra")  # the code under test, installed or not
    torch.save(head_state(), tmp_path / "head.pth")
    spec = {"clipscore": {"pretrained": str(tiny_clip_dir)},
            "pickscore": {"pretrained": str(tiny_clip_dir), "processor": str(tiny_clip_dir)},
            "aesthetic": {"pretrained": str(tiny_clip_dir), "head": str(tmp_path / "head.pth")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    generator = np.random.default_rng(9)
    batches = [generator.integers(0, 256, (2, 32, 36, 3), dtype=np.uint8),
               generator.integers(0, 256, (2, 50, 31, 3), dtype=np.uint8)]
    images = write_images(tmp_path, batches, [["a red fox", "zzz"], ["a blue car", "a"]])
    runs = {}
    for mode in ("torchvision", "blocked"):
        run_reference("clip", "clip_ours.py", str(package), mode, str(tmp_path / "spec.json"), images,
                      str(tmp_path / "prompts.json"), str(tmp_path / f"{mode}.npz"))
        with np.load(tmp_path / f"{mode}.npz") as arrays:
            runs[mode] = {key: arrays[key] for key in arrays.files}
    here = {"clipscore": ClipScore(**spec["clipscore"]), "pickscore": PickScore(**spec["pickscore"]),
            "aesthetic": AestheticScore(**spec["aesthetic"])}
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    for name, reward in here.items():
        for i, batch in enumerate(batches):
            ours = reward(as_images(batch), prompts[i]).numpy()
            assert np.array_equal(runs["torchvision"][f"{name}_{i}"], runs["blocked"][f"{name}_{i}"]), name
            assert np.array_equal(runs["torchvision"][f"{name}_{i}"], ours), name
    # The switch is real: transformers' auto-selected processor gives other pixels with torchvision than without.
    assert np.abs(runs["torchvision"]["auto_pixels"] - runs["blocked"]["auto_pixels"]).max() > 1e-2
