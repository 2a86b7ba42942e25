"""LAION aesthetic reward: a tiny CLIP of the real classes plus an MLP head saved as LAION publishes it."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.models.loading import ModelLoadError
from pcpo_hydra.rewards.aesthetic import AestheticHead, AestheticScore

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
    from pcpo_hydra.models.loading import WeightsFor
    from pcpo_hydra.rewards.aesthetic import load_head

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
