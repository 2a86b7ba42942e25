"""ImageReward on a tiny BLIP of the real transformers classes, written as ImageReward.pt names its tensors.

The test maps transformers' names back to the published ones by its own table, saves the file, a
med_config.json in BLIP's format and a BERT word-piece tokenizer, and loads them through the reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.rewards.aesthetic import AestheticHead
from pcpo_hydra.rewards.imagereward import ImageReward
from pcpo_hydra.weights import ModelLoadError

from conftest import CLIP_MEAN, CLIP_STD

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's score normalisation
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "fox", "car", "photo", "of"]
CLS, SEP, PAD, RED, BLUE = 2, 3, 0, 6, 7
DEC, ENC = len(VOCAB), len(VOCAB) + 1  # the two tokens BLIP adds to bert-base-uncased
SIDE, PATCH, WIDTH = 16, 8, 128  # tiny ViT: 16 px in 2x2 patches, two 64-wide heads (ViT-L: 224, 16, 1024)
TEXT_WIDTH = 32
MED_CONFIG = {  # BLIP's med_config.json with tiny sizes; BLIP replaces encoder_width by the ViT's width
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": TEXT_WIDTH, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2,
    "encoder_width": 768, "add_cross_attention": True,
}
# transformers' BlipVisionModel names -> BLIP's ViT names, applied in order.
PUBLISHED_VISION_NAMES = (
    ("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
    ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
    ("self_attn.qkv", "attn.qkv"), ("post_layernorm", "norm"),
)


@dataclass
class Tiny:
    """A tiny ImageReward on disk, and the modules its checkpoint was written from."""

    folder: Path
    vision: BlipVisionModel
    text: BlipTextModel
    head: AestheticHead
    state: dict[str, torch.Tensor]

    def reward(self, **overrides) -> ImageReward:
        paths = {"checkpoint": self.folder / "ImageReward.pt", "med_config": self.folder / "med_config.json",
                 "tokenizer": self.folder / "tokenizer"}
        return ImageReward(**{key: str(path) for key, path in paths.items()} | overrides)


def tiny_modules(layers: int) -> tuple[BlipVisionModel, BlipTextModel, AestheticHead]:
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=layers, num_attention_heads=2,
        image_size=SIDE, patch_size=PATCH, layer_norm_eps=1e-6))
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings")
    text = BlipTextModel(BlipTextConfig(
        **{key: MED_CONFIG[key] for key in fields}, num_hidden_layers=layers, encoder_hidden_size=WIDTH,
        is_decoder=True, bos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    return vision, text, AestheticHead(TEXT_WIDTH)


def published_state(vision: nn.Module, text: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors under ImageReward.pt's names, with the unused ones the real file also holds."""
    state = {}
    for key, value in vision.state_dict().items():
        for ours, theirs in PUBLISHED_VISION_NAMES:
            key = key.replace(ours, theirs)
        state[f"blip.visual_encoder.{key}"] = value
    state |= {f"blip.text_encoder.{key}": value for key, value in text.state_dict().items()}
    state |= {f"mlp.{key}": value for key, value in head.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(MED_CONFIG["max_position_embeddings"])[None]
    state |= {"blip.vision_proj.weight": torch.ones(8, WIDTH), "blip.vision_proj.bias": torch.ones(8),
              "blip.text_proj.weight": torch.ones(8, TEXT_WIDTH), "blip.text_proj.bias": torch.ones(8)}
    return state


def write_tiny(folder: Path, vision: nn.Module, text: nn.Module, head: nn.Module) -> Tiny:
    state = published_state(vision, text, head)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG | {"num_hidden_layers": len(text.encoder.layer)}))
    BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(folder / "tokenizer")
    return Tiny(folder, vision.eval(), text.eval(), head.eval(), state)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """Two layers each, every tensor random (LayerNorm weights and biases too), so a misplaced one shows."""
    modules = tiny_modules(layers=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return write_tiny(tmp_path_factory.mktemp("imagereward"), *modules)


def images(count: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(1))


def hand_preprocessed(image: torch.Tensor, size: tuple[int, int], rows: slice, cols: slice) -> torch.Tensor:
    """8-bit pixels, PIL bicubic resize to `size` (w, h), the given crop, /255, CLIP's mean and std."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    resized = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC), dtype=np.float32)[rows, cols] / 255
    normalised = (resized - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)


def test_every_tensor_lands_in_the_blip_modules(tiny: Tiny) -> None:
    reward = tiny.reward()
    for loaded, original in ((reward.vision, tiny.vision), (reward.text, tiny.text), (reward.head, tiny.head)):
        ours, theirs = loaded.state_dict(), original.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    vision, text = reward.vision.config, reward.text.config
    assert (vision.image_size, vision.patch_size, vision.num_attention_heads) == (SIDE, PATCH, 2)
    assert vision.layer_norm_eps == 1e-6  # BLIP's ViT, not BlipVisionConfig's default 1e-5
    assert (text.num_attention_heads, text.num_hidden_layers, text.encoder_hidden_size) == (4, 2, WIDTH)
    assert all(hasattr(layer, "crossattention") for layer in reward.text.encoder.layer)


def test_vision_encoder_computes_blips_vit(tiny: Tiny) -> None:
    """BLIP's ViT forward written out on the published tensors: pre-norm blocks, eps 1e-6, final norm."""
    reward = tiny.reward()
    pixels = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    p = {key.removeprefix("blip.visual_encoder."): value for key, value in tiny.state.items()}

    def linear(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])

    def norm(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (WIDTH,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)

    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(2, -1, -1), x], dim=1) + p["pos_embed"]
    for block in ("blocks.0", "blocks.1"):
        q, k, v = linear(f"{block}.attn.qkv", norm(f"{block}.norm1", x)).reshape(2, 5, 3, 2, 64).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, WIDTH)
        x = x + linear(f"{block}.attn.proj", attended)
        x = x + linear(f"{block}.mlp.fc2", F.gelu(linear(f"{block}.mlp.fc1", norm(f"{block}.norm2", x))))
    expected = norm("norm", x)
    with torch.no_grad():
        torch.testing.assert_close(reward.vision(pixel_values=pixels).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_preprocessing_is_resize_short_side_centre_crop_and_clip_normalise(tiny: Tiny) -> None:
    reward = tiny.reward()
    wide, tall = images(2, 32, 47), images(1, 47, 32)
    # 32x47 -> short side 16, long int(16 * 47 / 32) = 23; torchvision's crop starts at round(3.5) = 4 (not 3).
    expected = torch.stack([hand_preprocessed(image, (23, 16), slice(None), slice(4, 20)) for image in wide])
    torch.testing.assert_close(reward.preprocess(wide), expected, rtol=0, atol=1e-5)
    expected = hand_preprocessed(tall[0], (16, 23), slice(4, 20), slice(None))
    torch.testing.assert_close(reward.preprocess(tall)[0], expected, rtol=0, atol=1e-5)
    square = images(1, SIDE, SIDE)  # already at size: only 8-bit rounding and normalisation
    expected = hand_preprocessed(square[0], (SIDE, SIDE), slice(None), slice(None))
    torch.testing.assert_close(reward.preprocess(square)[0], expected, rtol=0, atol=1e-6)


def test_prompts_are_cls_words_sep_padded_to_35_with_blips_added_tokens(tiny: Tiny) -> None:
    reward = tiny.reward()
    tokens = reward.tokenize(["A red fox", "red " * 40, "[ENC] [DEC] car"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (3, 35)
    assert ids[0, :5].tolist() == [CLS, 5, RED, 8, SEP] and ids[0, 5:].eq(PAD).all()  # [CLS] kept, not [ENC]
    assert mask[0].tolist() == [1] * 5 + [0] * 30
    assert ids[1].tolist() == [CLS] + [RED] * 33 + [SEP] and mask[1].all()  # cut to 35
    assert ids[2, :5].tolist() == [CLS, ENC, DEC, 9, SEP]


def test_score_is_the_standardised_mlp_on_the_cross_attended_cls(tiny: Tiny) -> None:
    reward = tiny.reward(batch_size=2)
    batch, prompts = images(3, SIDE, SIDE), ["a red fox", "a blue car", "photo of a fox"]
    scores = reward(batch, prompts)
    pixels = torch.stack([hand_preprocessed(image, (SIDE, SIDE), slice(None), slice(None)) for image in batch])
    tokenizer = BertTokenizer.from_pretrained(tiny.folder / "tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokens = tokenizer(prompts, padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = tiny.vision(pixel_values=pixels).last_hidden_state
        all_image_tokens = torch.ones(image_tokens.shape[:2], dtype=torch.long)  # ImageReward's image_atts
        text = tiny.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         encoder_hidden_states=image_tokens, encoder_attention_mask=all_image_tokens)
    x = text.last_hidden_state[:, 0]
    for i in (0, 2, 4, 6, 7):  # ImageReward's MLP: five affine maps (its ReLUs are commented out, dropout is off)
        x = x @ tiny.state[f"mlp.layers.{i}.weight"].T + tiny.state[f"mlp.layers.{i}.bias"]
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # Batches of 2 + 1 against one of 3 sum in another order: 3e-5 on scores ~2 under transformers 5.24.
    torch.testing.assert_close(scores, (x.squeeze(-1) - MEAN) / STD, rtol=1e-4, atol=1e-4)
    assert torch.equal(reward(batch, prompts), scores)  # deterministic
    torch.testing.assert_close(tiny.reward(batch_size=3)(batch, prompts), scores, rtol=1e-4, atol=1e-4)  # 2+1 == 3


def pair(size: int, i: int) -> torch.Tensor:
    """Unit vector i minus unit vector i + 1: zero-mean, so LayerNorm only rescales it."""
    return F.one_hot(torch.tensor(i), size).float() - F.one_hot(torch.tensor(i + 1), size).float()


def colour_matching_modules() -> tuple[BlipVisionModel, BlipTextModel, AestheticHead]:
    """Weights set by hand so the score is high when the prompt's colour word names the image's colour.

    Vision: each patch token is LayerNorm(s * e01 + e23) with s the sign of (red - blue) in the patch, the
    [CLS] image token LayerNorm(e45) (eXY = unit X minus unit Y); blocks are identity. Text: [CLS] attends
    evenly to all tokens and picks up +-e23 from "red"/"blue"; its cross-attention query is that sign, the
    patch keys are s, so a match concentrates attention on the patches, whose value writes e45; the MLP reads e45.
    """
    vision, text, head = tiny_modules(layers=1)
    with torch.no_grad():
        for module in (vision, text, head):
            for parameter in module.parameters():
                parameter.zero_()
            for norm in (m for m in module.modules() if isinstance(m, nn.LayerNorm)):
                norm.weight.fill_(1)
        patch = vision.embeddings.patch_embedding
        patch.weight[:, 0] = pair(WIDTH, 0)[:, None, None] / PATCH**2  # + mean red
        patch.weight[:, 2] = -pair(WIDTH, 0)[:, None, None] / PATCH**2  # - mean blue
        patch.bias.copy_(pair(WIDTH, 2))
        vision.embeddings.class_embedding[0, 0] = pair(WIDTH, 4)
        words = text.embeddings.word_embeddings.weight
        words[CLS], words[RED], words[BLUE] = pair(TEXT_WIDTH, 0), pair(TEXT_WIDTH, 2), -pair(TEXT_WIDTH, 2)
        layer = text.encoder.layer[0]
        layer.attention.self.value.weight[2, 2] = layer.attention.self.value.weight[3, 3] = 1
        layer.attention.output.dense.weight.copy_(torch.eye(TEXT_WIDTH))
        cross = layer.crossattention.self
        cross.query.weight[0, :] = pair(TEXT_WIDTH, 2)
        cross.key.weight[0, :] = pair(WIDTH, 0)
        cross.value.weight[4, 2], cross.value.weight[5, 2] = 1, -1
        layer.crossattention.output.dense.weight.copy_(torch.eye(TEXT_WIDTH))
        head.layers[0].weight[0] = pair(TEXT_WIDTH, 4)
        for i in (2, 4, 6, 7):
            head.layers[i].weight[0, 0] = 1
    return vision, text, head


def test_a_prompt_naming_the_images_colour_scores_higher(tmp_path: Path) -> None:
    reward = write_tiny(tmp_path, *colour_matching_modules()).reward()
    red, blue = torch.zeros(3, 20, 20), torch.zeros(3, 20, 20)
    red[0], blue[2] = 1, 1
    batch = torch.stack([red, red, blue, blue])
    scores = reward(batch, ["a red fox", "a blue fox", "a blue fox", "a red fox"])
    assert scores[[0, 2]].min() > scores[[1, 3]].max() + 3
    # A mismatch sends the attention to the [CLS] image token, which writes nothing: the MLP gives ~0.
    torch.testing.assert_close(scores[[1, 3]], torch.full((2,), -MEAN / STD), rtol=0, atol=0.01)


def test_missing_files_name_the_key_to_set(tiny: Tiny, tmp_path: Path) -> None:
    cases = {
        "checkpoint": (tmp_path / "ImageReward.pt", "reward.checkpoint=<local path>"),
        "med_config": (tmp_path / "med_config.json", "reward.med_config=<local path>"),
        "tokenizer": (tmp_path / "no_tokenizer", "reward.tokenizer=<local path>"),
    }
    for key, (path, fix) in cases.items():
        with pytest.raises(ModelLoadError) as error:
            tiny.reward(**{key: str(path)})
        assert "reward 'imagereward'" in str(error.value) and fix in str(error.value), key
    (tmp_path / "empty").mkdir()  # transformers 5 makes an empty tokenizer of an empty folder
    with pytest.raises(ModelLoadError, match=r"the tokenizer of reward 'imagereward'.*no vocabulary.*reward.tokenizer="):
        tiny.reward(tokenizer=str(tmp_path / "empty"))


def test_offline_uncached_hub_files_are_a_clear_error(tiny: Tiny, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"the ImageReward.pt of reward 'imagereward' 'THUDM/ImageReward'\. "
                       r"HF_HUB_OFFLINE is set.*reward.checkpoint=.*`hf download THUDM/ImageReward`"):
        ImageReward()
    with pytest.raises(ModelLoadError, match=r"'pcpo-hydra-tests/no-tokenizer'.*reward.tokenizer="):
        tiny.reward(tokenizer="pcpo-hydra-tests/no-tokenizer")


def test_a_checkpoint_with_other_keys_or_shapes_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    def refused(state: dict[str, torch.Tensor], match: str) -> None:
        torch.save(state, tmp_path / "bad.pt")
        with pytest.raises(ModelLoadError, match=match + r".*reward.checkpoint="):
            tiny.reward(checkpoint=str(tmp_path / "bad.pt"))

    refused(tiny.state | {"blip.itm_head.weight": torch.ones(2)}, r"unknown keys \['blip.itm_head.weight'\]")
    refused(tiny.state | {"blip.text_encoder.pooler.dense.bias": torch.ones(1)}, r"text encoder.*unexpected \['pooler")
    gone = "encoder.layer.1.crossattention.self.key.bias"
    without = {key: value for key, value in tiny.state.items() if key != f"blip.text_encoder.{gone}"}
    refused(without, rf"text encoder.*missing \['{gone}'\]")
    refused(tiny.state | {"mlp.layers.7.bias": torch.ones(2)}, r"MLP head does not match.*size mismatch")
    refused({k: v for k, v in tiny.state.items() if k != "blip.visual_encoder.cls_token"}, "vision encoder has no")
    torch.save({"model": tiny.state}, tmp_path / "wrapped.pt")
    with pytest.raises(ModelLoadError, match="holds no state dict of tensors"):
        tiny.reward(checkpoint=str(tmp_path / "wrapped.pt"))


def test_config_option_composes_and_rejects_bad_values(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=imagereward"))
    assert (cfg.reward.checkpoint, cfg.reward.med_config, cfg.reward.tokenizer) == (
        "THUDM/ImageReward/ImageReward.pt", "THUDM/ImageReward/med_config.json", "bert-base-uncased")
    assert cfg.reward.device == "cpu"
    with pytest.raises(ConfigError, match="reward.dtype='float64'"):
        validate(compose_cfg("reward=imagereward", "reward.dtype=float64"))
    with pytest.raises(ConfigError, match="reward.batch_size=0"):
        validate(compose_cfg("reward=imagereward", "reward.batch_size=0"))


@pytest.mark.integration
def test_scores_equal_image_rewards_own_code_on_its_checkpoint_format(tmp_path: Path) -> None:
    """image-reward 1.5's ImageReward.score (its BLIP, transform and tokenizer) against ours, on the same file."""
    from conftest import reference_inputs, run_reference

    batch, prompts = reference_inputs(tmp_path)
    run_reference("imagereward", "imagereward_score.py", str(tmp_path))
    theirs = torch.tensor(json.loads((tmp_path / "scores.json").read_text()))
    reward = ImageReward(checkpoint=str(tmp_path / "ImageReward.pt"), med_config=str(tmp_path / "med_config.json"),
                         tokenizer=str(tmp_path / "bert-base-uncased"))
    ours = torch.cat([reward(image, [prompt]) for image, prompt in zip(batch, prompts)])
    assert theirs.abs().min() > 0.01  # scores away from 0, so the relative tolerance means something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
