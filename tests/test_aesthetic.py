"""LAION aesthetic reward: a tiny CLIP of the real classes plus an MLP head saved as LAION publishes it."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.rewards.aesthetic import AestheticHead, AestheticScore
from pcpo_hydra.rewards.clip_score import ClipTransform
from pcpo_hydra.weights import ModelLoadError

from conftest import run_reference
from test_clip_score import as_images, copy_processor_files, read_scores, write_images

WIDTH = 16  # the tiny CLIP's projection dim (ViT-L/14: 768)


def head_state(width: int = WIDTH) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return AestheticHead(width).state_dict()


@pytest.fixture(scope="module")
def head_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_state(), path)
    return path


def images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, 32, 40, generator=torch.Generator().manual_seed(2))


def test_published_layer_names_and_sizes() -> None:
    shapes = {key: tuple(value.shape) for key, value in head_state(768).items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_score_is_the_mlp_on_the_normalised_clip_embedding(tiny_clip_dir: Path, head_pth: Path, tmp_path: Path) -> None:
    reward = AestheticScore(pretrained=str(tiny_clip_dir), head=str(head_pth), batch_size=2)
    batch = images()
    scores = reward(batch, ["a", "b", "c"])
    embedding = reward.clip.embed_images(batch)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(3), atol=1e-6)
    x, state = embedding, head_state()
    for i in (0, 2, 4, 6, 7):  # dropout is inactive when scoring: five affine maps in a row
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=1e-5, atol=1e-6)
    # The same head as .safetensors scores the same.
    save_file(head_state(), tmp_path / "head.safetensors")
    again = AestheticScore(pretrained=str(tiny_clip_dir), head=str(tmp_path / "head.safetensors"))
    torch.testing.assert_close(again(batch, ["a", "b", "c"]), scores, rtol=1e-5, atol=1e-7)


def test_missing_or_mismatched_heads_name_the_key(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"reward 'aesthetic'.*reward.head=<local path>"):
        AestheticScore(pretrained=str(tiny_clip_dir), head=str(tmp_path / "missing.pth"))
    torch.save(head_state(768), tmp_path / "vit_l.pth")
    with pytest.raises(ModelLoadError, match="takes 768-d embeddings"):
        AestheticScore(pretrained=str(tiny_clip_dir), head=str(tmp_path / "vit_l.pth"))
    torch.save({"weight": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="not the aesthetic MLP"):
        AestheticScore(pretrained=str(tiny_clip_dir), head=str(tmp_path / "other.pth"))


def test_a_head_with_missing_extra_or_misshapen_weights_fails_naming_the_file_and_keys(tmp_path: Path) -> None:
    """Every published key, no other, in its shape: a partial head would score with random layers."""
    from pcpo_hydra.rewards.aesthetic import load_head
    from pcpo_hydra.weights import WeightsFor

    owner = WeightsFor("reward 'aesthetic'", "reward.head", "the MLP")
    partial = {key: value for key, value in head_state().items() if not key.startswith("layers.6.")}
    extra = {**head_state(), "layers.1.weight": torch.ones(1)}
    misshapen = {**head_state(), "layers.4.weight": torch.ones(64, 100)}
    expected = {
        "partial.pth": (partial, "missing keys ['layers.6.bias', 'layers.6.weight']"),
        "extra.pth": (extra, "unexpected keys ['layers.1.weight']"),
        "misshapen.pth": (misshapen, "shapes differ: layers.4.weight (64, 100) (MLP: (64, 128))"),
    }
    for name, (state, reason) in expected.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(ModelLoadError) as error:
            load_head(tmp_path / name, owner)
        assert f"'{tmp_path / name}'" in str(error.value) and reason in str(error.value)
        assert "Fix: set reward.head=<local path>" in str(error.value)


def test_config_option_composes_and_rejects_a_bad_batch_size(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=aesthetic"))
    assert cfg.reward.pretrained == "openai/clip-vit-large-patch14"
    with pytest.raises(ConfigError, match="reward.batch_size=0"):
        validate(compose_cfg("reward=aesthetic", "reward.batch_size=0"))


def test_an_unreachable_head_url_is_a_clear_error(tiny_clip_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    url = "http://127.0.0.1:9/sac+logos+ava1-l14-linearMSE.pth"  # the discard port: nothing listens
    with pytest.raises(ModelLoadError, match=r"Cannot load reward 'aesthetic' 'http://127.0.0.1:9/.*reward.head="):
        AestheticScore(pretrained=str(tiny_clip_dir), head=url)


def test_a_head_url_is_downloaded_once_into_torchs_hub_cache(
    tiny_clip_dir: Path, head_pth: Path, tmp_path: Path, monkeypatch
) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(head_pth.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        url = f"http://127.0.0.1:{server.server_address[1]}/sac%2Blogos%2Bava1-l14-linearMSE.pth"
        from_url = AestheticScore(pretrained=str(tiny_clip_dir), head=url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    cached = tmp_path / "hub" / "pcpo_hydra" / "sac+logos+ava1-l14-linearMSE.pth"
    assert cached.read_bytes() == head_pth.read_bytes()
    again = AestheticScore(pretrained=str(tiny_clip_dir), head=url)  # the server is gone: the cache serves
    batch = images(2)
    assert torch.equal(from_url(batch, ["a", "b"]), again(batch, ["a", "b"]))


def test_the_crop_rounds_its_offset_as_torchvision_does() -> None:
    """24 x 27 after the resize: LAION's transform drops 2 columns on the left, transformers' processor 1."""
    image = torch.rand(1, 3, 32, 36, generator=torch.Generator().manual_seed(4))
    openai = ClipTransform.openai_clip(24)
    floored = ClipTransform(24, (24, 24), openai.mean, openai.std, "floor")
    resized = ClipTransform(24, (24, 27), openai.mean, openai.std, "floor")(image)  # the whole resized image
    torch.testing.assert_close(openai(image), resized[..., 2:26], rtol=0, atol=0)
    torch.testing.assert_close(floored(image), resized[..., 1:25], rtol=0, atol=0)


# Image sizes whose resized longer side exceeds the 24 px crop by 3 (rows or columns: the rounding
# of the crop offset differs), by 7 without a resize, by 4, and not at all.
REFERENCE_SIZES = ((32, 36), (36, 32), (24, 31), (40, 48), (30, 30))


def openai_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's vision tower and projection renamed into transformers' CLIPModel (the text tower is unused)."""
    ours = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].T,  # OpenAI multiplies `x @ proj`
        "logit_scale": state["logit_scale"],
    }
    for name, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for param in ("weight", "bias"):
            ours[f"vision_model.{name}.{param}"] = state[f"visual.{theirs}.{param}"]
    layers = {key.split(".")[3] for key in state if key.startswith("visual.transformer.resblocks.")}
    for i in map(int, layers):
        theirs, mine = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for param in ("weight", "bias"):
            for name, stacked in zip(("q_proj", "k_proj", "v_proj"), state[f"{theirs}attn.in_proj_{param}"].chunk(3)):
                ours[f"{mine}self_attn.{name}.{param}"] = stacked
            for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                ours[f"{mine}{new}.{param}"] = state[f"{theirs}{old}.{param}"]
    return ours


def transformers_clip_of(state: dict[str, torch.Tensor], tiny_clip_dir: Path, folder: Path) -> Path:
    """A transformers CLIP folder whose vision tower holds OpenAI CLIP's weights `state`."""
    from transformers import CLIPConfig, CLIPModel

    text = CLIPConfig.from_pretrained(tiny_clip_dir).text_config.to_dict()
    width = state["visual.conv1.weight"].shape[0]
    config = CLIPConfig(
        text_config=text, projection_dim=state["visual.proj"].shape[1],
        vision_config={"image_size": 24, "patch_size": state["visual.conv1.weight"].shape[-1], "hidden_size": width,
                       "intermediate_size": 4 * width, "num_attention_heads": width // 64,
                       "num_hidden_layers": len({k.split(".")[3] for k in state if "visual.transformer" in k})},
    )
    model = CLIPModel(config)
    mapped = openai_to_transformers(state)
    missing = set(model.state_dict()) - set(mapped)
    assert all(key.startswith("text_model.") or key == "text_projection.weight" for key in missing), missing
    model.load_state_dict(mapped, strict=False)
    model.save_pretrained(folder)
    copy_processor_files(tiny_clip_dir, folder)
    return folder


@pytest.mark.integration
def test_scores_equal_laions_script_on_openai_clip(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """LAION's simple_inference.py route (clip.load, its preprocess, numpy normalisation, the MLP) vs ours."""
    generator = np.random.default_rng(5)
    batches = [generator.integers(0, 256, (2, h, w, 3), dtype=np.uint8) for h, w in REFERENCE_SIZES]
    images = write_images(tmp_path, batches)
    run_reference("clip", "aesthetic_laion.py", str(tmp_path), images, str(tmp_path / "laion.npz"))
    laion = read_scores(tmp_path / "laion.npz", len(batches))
    folder = transformers_clip_of(torch.load(tmp_path / "clip.pt"), tiny_clip_dir, tmp_path / "hf_clip")
    reward = AestheticScore(pretrained=str(folder), head=str(tmp_path / "head.pth"))
    for batch, expected in zip(batches, laion):
        torch.testing.assert_close(reward(as_images(batch), ["", ""]).double(), expected, rtol=1e-4, atol=0)
    # The comparison sees the crop: transformers' floored offset misses LAION's scores on the odd sizes.
    reward.clip.transform = ClipTransform(24, (24, 24), reward.clip.transform.mean, reward.clip.transform.std, "floor")
    for batch, expected in list(zip(batches, laion))[:3]:
        floored = reward(as_images(batch), ["", ""]).double()
        assert ((floored - expected).abs() / expected.abs()).max() > 1e-2
