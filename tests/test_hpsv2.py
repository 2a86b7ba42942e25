"""HPS v2.1: an open_clip-named checkpoint of a tiny CLIP, loaded into transformers' CLIPModel by the real path.

The open_clip side is written out here by hand, independently of the reward's converter: its key
names (the inverse of the conversion) and its forward pass (nn.MultiheadAttention on the stacked
q/k/v, `x @ proj`, pooling at the highest token id), so a swapped or misplaced tensor shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from transformers import CLIPConfig, CLIPModel

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.rewards.hpsv2 import HPSv2Score, clean_prompt
from pcpo_hydra.weights import ModelLoadError

from conftest import CLIP_MEAN as MEAN, CLIP_SIDE as SIDE, CLIP_STD as STD
from test_clip_score import colour_clip, colour_pairs

LAYERS, HEADS, PATCH = 2, 4, 8  # two blocks per tower, so a block index mix-up shows


@pytest.fixture(scope="module")
def architecture_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP's config (two GELU blocks per tower, as in ViT-H-14), tokenizer and image processor; no weights."""
    folder = tmp_path_factory.mktemp("hps_architecture")
    shutil.copytree(tiny_clip_dir, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    config = CLIPConfig.from_pretrained(tiny_clip_dir)
    for tower in (config.text_config, config.vision_config):
        tower.num_hidden_layers, tower.hidden_act = LAYERS, "gelu"
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hps_model(architecture_dir: Path) -> CLIPModel:
    """A model of that config with every tensor random (biases and LayerNorms too, unlike a fresh init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = CLIPModel(CLIPConfig.from_pretrained(architecture_dir)).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def open_clip_state(model: CLIPModel) -> dict[str, Tensor]:
    """The model's weights under open_clip's names (the inverse of the reward's converter, written out)."""
    ours = model.state_dict()
    theirs = {
        "visual.conv1.weight": ours["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": ours["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": ours["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": ours["visual_projection.weight"].T,
        "token_embedding.weight": ours["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": ours["text_model.embeddings.position_embedding.weight"],
        "text_projection": ours["text_projection.weight"].T,
        "logit_scale": ours["logit_scale"],
    }
    for param in ("weight", "bias"):
        theirs[f"visual.ln_pre.{param}"] = ours[f"vision_model.pre_layrnorm.{param}"]
        theirs[f"visual.ln_post.{param}"] = ours[f"vision_model.post_layernorm.{param}"]
        theirs[f"ln_final.{param}"] = ours[f"text_model.final_layer_norm.{param}"]
        for tower, prefix, config in (("vision_model", "visual.", model.config.vision_config),
                                      ("text_model", "", model.config.text_config)):
            for i in range(config.num_hidden_layers):
                src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
                theirs[f"{dst}attn.in_proj_{param}"] = torch.cat(
                    [ours[f"{src}self_attn.{name}_proj.{param}"] for name in ("q", "k", "v")])
                theirs[f"{dst}attn.out_proj.{param}"] = ours[f"{src}self_attn.out_proj.{param}"]
                theirs[f"{dst}ln_1.{param}"] = ours[f"{src}layer_norm1.{param}"]
                theirs[f"{dst}ln_2.{param}"] = ours[f"{src}layer_norm2.{param}"]
                theirs[f"{dst}mlp.c_fc.{param}"] = ours[f"{src}mlp.fc1.{param}"]
                theirs[f"{dst}mlp.c_proj.{param}"] = ours[f"{src}mlp.fc2.{param}"]
    return {key: value.clone().contiguous() for key, value in theirs.items()}


def save_checkpoint(state: dict[str, Tensor], path: Path) -> Path:
    """As HPSv2's training saves it: under "state_dict", with DistributedDataParallel's "module." prefix."""
    torch.save({"epoch": 1, "state_dict": {f"module.{key}": value for key, value in state.items()}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(hps_model: CLIPModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(open_clip_state(hps_model), tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt")


def open_clip_embeddings(state: dict[str, Tensor], pixels: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """open_clip's forward from its state dict: pre-norm blocks, GELU, class token / highest-id token pooled."""

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    def blocks(x: Tensor, prefix: str, mask: Tensor | None) -> Tensor:
        for i in range(LAYERS):
            block = f"{prefix}transformer.resblocks.{i}."
            attention = torch.nn.MultiheadAttention(x.shape[-1], HEADS, batch_first=True)
            attention.load_state_dict({name: state[f"{block}attn.{name}"] for name in
                                       ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
            h = norm(x, f"{block}ln_1")
            x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = norm(x, f"{block}ln_2")
            h = F.gelu(F.linear(h, state[f"{block}mlp.c_fc.weight"], state[f"{block}mlp.c_fc.bias"]))
            x = x + F.linear(h, state[f"{block}mlp.c_proj.weight"], state[f"{block}mlp.c_proj.bias"])
        return x

    patches = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(pixels), 1, -1), patches], dim=1)
    x = blocks(norm(x + state["visual.positional_embedding"], "visual.ln_pre"), "visual.", None)
    image = norm(x[:, 0], "visual.ln_post") @ state["visual.proj"]
    length = tokens.shape[1]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:length]
    x = norm(blocks(x, "", torch.full((length, length), float("-inf")).triu(1)), "ln_final")
    text = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ state["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def images(count: int = 3, height: int = 32, width: int = 40) -> Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(4))


def hand_padded(image: Tensor) -> Tensor:
    """HPSv2's val transform by hand: 8-bit pixels as floats, longer side to 24 (bicubic, antialiased), centred on black."""
    pixels = (image * 255).round().div(255)[None]
    height, width = image.shape[1:]
    scale = SIDE / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if scale != 1:
        pixels = F.interpolate(pixels, size=(new_height, new_width), mode="bicubic", antialias=True)
    canvas = torch.zeros(3, SIDE, SIDE)  # black
    top, left = (SIDE - new_height) // 2, (SIDE - new_width) // 2
    canvas[:, top:top + new_height, left:left + new_width] = pixels[0]
    return (canvas - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def reward(architecture_dir: Path, checkpoint: Path) -> HPSv2Score:
    return HPSv2Score(pretrained=str(architecture_dir), checkpoint=str(checkpoint), batch_size=2)


def test_checkpoint_round_trips_into_the_transformers_model(reward: HPSv2Score, hps_model: CLIPModel) -> None:
    loaded = reward.clip.model.state_dict()
    original = hps_model.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[key], value) for key, value in original.items())
    batch, prompts = images(), ["a red fox", "a blue car", "zzz"]
    tokens = reward.clip.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        vision = hps_model.get_image_features(pixel_values=reward.clip.preprocess(batch)).pooler_output
        text = hps_model.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(reward.clip.embed_images(batch), F.normalize(vision, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(reward.clip.embed_prompts(prompts), F.normalize(text, dim=-1), rtol=0, atol=1e-6)


def test_score_is_open_clips_cosine_without_logit_scale(reward: HPSv2Score, hps_model: CLIPModel) -> None:
    batch, prompts = images(), ["a red fox", "a blue car", "zzz"]
    scores = reward(batch, prompts)
    state = open_clip_state(hps_model)
    tokens = reward.clip.tokenizer(prompts, padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        image, text = open_clip_embeddings(state, torch.stack([hand_padded(x) for x in batch]), tokens)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, (image * text).sum(-1), rtol=0, atol=1e-5)
    assert hps_model.logit_scale.exp() > 2  # so a stray logit scale would not hide in the tolerance
    assert torch.equal(reward(batch, prompts), scores)  # deterministic, batches of 2 + 1
    reward.batch_size = 3
    try:
        torch.testing.assert_close(reward(batch, prompts), scores, rtol=0, atol=1e-6)
    finally:
        reward.batch_size = 2


@pytest.mark.parametrize("height, width", [(32, 40), (40, 32), (SIDE, SIDE), (7, 50)])
def test_preprocessing_fits_the_longer_side_and_pads_with_black(reward: HPSv2Score, height: int, width: int) -> None:
    batch = images(2, height, width)
    expected = torch.stack([hand_padded(image) for image in batch])
    torch.testing.assert_close(reward.clip.preprocess(batch), expected, rtol=0, atol=1e-5)
    if (height, width) == (32, 40):  # 40 -> 24, 32 -> 19.2 -> 19 rows: 2 black rows above, 3 below
        black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
        rows = reward.clip.preprocess(batch)[0].sub(black).abs().amax(dim=(0, 2)) < 1e-5
        assert rows.tolist() == [True] * 2 + [False] * 19 + [True] * 3


def test_noisy_images_are_resized_as_float_tensors_not_as_8_bit_pil_images(reward: HPSv2Score) -> None:
    """PIL's bicubic on the 8-bit image clips its overshoot to 0..255; HPSv2 resizes the float tensor, unclipped."""
    noisy = images(1, 16, 12).round()  # black and white pixels: bicubic overshoots most on them
    ours = reward.clip.preprocess(noisy)[0]
    pil = Image.fromarray((noisy[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()).resize((18, 24), Image.BICUBIC)
    pil_pixels = (torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
                  - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert (ours[:, :, 3:21] - pil_pixels).abs().max() > 0.3  # in normalised units
    torch.testing.assert_close(ours, hand_padded(noisy[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("prompt", "cleaned"), [
    ("salt &amp; pepper", "salt & pepper"),
    ("&amp;lt;tag&amp;gt;", "<tag>"),  # unescaped twice, as HPSv2 does
    ("a caf\u00c3\u00a9 in Paris", "a caf\u00e9 in Paris"),  # UTF-8 read as Latin-1, repaired by ftfy
    ("  no-break&nbsp;\u2003spaces \n\tand a tab ", "no-break spaces and a tab"),  # entities first, then whitespace
])
def test_prompts_are_cleaned_as_hpsv2s_tokenizer_cleans_them(reward: HPSv2Score, prompt: str, cleaned: str) -> None:
    assert clean_prompt(prompt) == cleaned
    tokenizer = reward.clip.tokenizer
    assert tokenizer(prompt).input_ids != tokenizer(cleaned).input_ids  # the tokenizer alone would not clean it
    assert torch.equal(reward.clip.embed_prompts([prompt]), reward.clip.embed_prompts([cleaned]))


def test_a_matching_prompt_scores_above_a_mismatched_one(tiny_clip_dir: Path, tmp_path: Path) -> None:
    path = save_checkpoint(open_clip_state(colour_clip(tiny_clip_dir)), tmp_path / "colour.pt")
    batch, prompts = colour_pairs()
    scores = HPSv2Score(pretrained=str(tiny_clip_dir), checkpoint=str(path))(batch, prompts).view(3, 3)
    assert torch.equal(scores.argmax(dim=1), torch.arange(3))
    assert (scores.diagonal() > 0.6).all() and (scores[~torch.eye(3, dtype=torch.bool)] < -0.4).all()


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.pop("visual.ln_post.bias"), "no weights for vision_model.post_layernorm.bias"),
    (lambda s: s.pop("transformer.resblocks.1.attn.in_proj_weight"),
     "no weights for text_model.encoder.layers.1.self_attn.k_proj.weight"),
    (lambda s: s.update({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}),
     "no place in the configured CLIP: visual.transformer.resblocks.0.ls_1.gamma"),
    (lambda s: s.update({"transformer.resblocks.2.ln_1.weight": torch.ones(32)}),
     "no place in the configured CLIP: text_model.encoder.layers.2.layer_norm1.weight"),
    (lambda s: s.update({"text_projection": torch.ones(32, 8)}), "text_projection.weight (8, 32) (config: (16, 32))"),
])
def test_a_checkpoint_that_does_not_fit_fails_clearly(
    architecture_dir: Path, hps_model: CLIPModel, tmp_path: Path, edit, reason: str
) -> None:
    state = open_clip_state(hps_model)
    edit(state)
    path = save_checkpoint(state, tmp_path / "edited.pt")
    with pytest.raises(ModelLoadError) as error:
        HPSv2Score(pretrained=str(architecture_dir), checkpoint=str(path))
    message = str(error.value)
    assert reason in message and "reward 'hpsv2'" in message and "reward.checkpoint=<local path>" in message


def test_missing_or_unreadable_files_name_their_key(architecture_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"reward 'hpsv2'.*no such file.*reward\.checkpoint=<local path>"):
        HPSv2Score(pretrained=str(architecture_dir), checkpoint=str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"not a torch checkpoint.*reward\.checkpoint=<local path>"):
        HPSv2Score(pretrained=str(architecture_dir), checkpoint=str(tmp_path / "text.pt"))
    torch.save({"state_dict": {"logit_scale": 1.0}}, tmp_path / "floats.pt")
    with pytest.raises(ModelLoadError, match=r"holds no state dict of tensors.*reward\.checkpoint="):
        HPSv2Score(pretrained=str(architecture_dir), checkpoint=str(tmp_path / "floats.pt"))
    with pytest.raises(ModelLoadError, match=r"reward 'hpsv2'.*reward\.pretrained=<local path>"):
        HPSv2Score(pretrained=str(tmp_path / "no_clip"), checkpoint=str(checkpoint))


def test_an_uncached_hub_checkpoint_offline_names_the_key(
    architecture_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as error:
        HPSv2Score(pretrained=str(architecture_dir))  # the default xswu/HPSv2/HPS_v2.1_compressed.pt
    message = str(error.value)
    for part in ("reward 'hpsv2'", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "reward.checkpoint=<local path>"):
        assert part in message


def test_config_option_composes_and_rejects_a_bad_batch_size(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=hpsv2"))
    assert cfg.reward.checkpoint == "xswu/HPSv2/HPS_v2.1_compressed.pt"
    assert cfg.reward.pretrained == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" and cfg.reward.device == "cpu"
    with pytest.raises(ConfigError, match="reward.batch_size=0"):
        validate(compose_cfg("reward=hpsv2", "reward.batch_size=0"))


def transformers_config(open_clip_config: dict) -> CLIPConfig:
    """transformers' CLIPConfig of the network an open_clip model config describes (GELU, as ViT-H-14)."""
    vision, text = open_clip_config["vision_cfg"], open_clip_config["text_cfg"]
    return CLIPConfig(
        text_config={"vocab_size": text["vocab_size"], "hidden_size": text["width"],
                     "intermediate_size": 4 * text["width"], "num_hidden_layers": text["layers"],
                     "num_attention_heads": text["heads"], "max_position_embeddings": text["context_length"],
                     "hidden_act": "gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": vision["image_size"], "patch_size": vision["patch_size"],
                       "hidden_size": vision["width"], "intermediate_size": 4 * vision["width"],
                       "num_hidden_layers": vision["layers"],
                       "num_attention_heads": vision["width"] // vision["head_width"], "hidden_act": "gelu"},
        projection_dim=open_clip_config["embed_dim"],
    )


@pytest.mark.integration
def test_scores_equal_hpsv2s_own_code_on_its_checkpoint_format(tmp_path: Path) -> None:
    """hpsv2 1.2.0's score() (its open_clip, transform and tokenizer) against ours, on the same tiny checkpoint."""
    import json

    from transformers import CLIPImageProcessor, CLIPTokenizer

    from conftest import reference_inputs, run_reference

    batch, prompts = reference_inputs(tmp_path)
    run_reference("hpsv2", "hpsv2_score.py", str(tmp_path))
    theirs = torch.tensor(json.loads((tmp_path / "scores.json").read_text()))
    architecture = tmp_path / "architecture"
    transformers_config(json.loads((tmp_path / "model_config.json").read_text())).save_pretrained(architecture)
    ends = {"bos_token": "<start_of_text>", "eos_token": "<end_of_text>"}  # open_clip's names for OpenAI's tokens
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77, **ends,
                  unk_token=ends["eos_token"], pad_token=ends["eos_token"]).save_pretrained(architecture)
    CLIPImageProcessor(image_mean=MEAN, image_std=STD).save_pretrained(architecture)
    reward = HPSv2Score(pretrained=str(architecture), checkpoint=str(tmp_path / "HPS_tiny.pt"))
    ours = torch.cat([reward(image, [prompt]) for image, prompt in zip(batch, prompts)])
    assert theirs.abs().min() > 0.01  # cosines well away from 0, so the relative tolerance means something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
