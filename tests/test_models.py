"""Model adapters: the tiny SD build, guidance, trainable weights, saving and loading, load errors."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from torch import Tensor, nn

from pcpo_hydra.models.stable_diffusion import StableDiffusionPolicy, load_stable_diffusion
from pcpo_hydra.models.tiny import build_tiny_sd, save_tiny_sd, tiny_tokenizer
from pcpo_hydra.weights import ModelLoadError, check_source, hub_unreachable, key_mismatch, load_component

LORA = {"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
PROMPTS = ["a cat", "a hedgehog washing the dishes", "Zebra, riding a bike!"]


@pytest.fixture
def tiny() -> StableDiffusionPolicy:
    return build_tiny_sd(seed=0)


@pytest.fixture
def tiny_lora() -> StableDiffusionPolicy:
    return build_tiny_sd(seed=0, lora=LORA)


def inputs(model: StableDiffusionPolicy, n: int = 3) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *model.latent_shape, generator=g), model.encode_prompts(PROMPTS[:n])


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class CountingNetwork(nn.Module):
    """Stands in for an accelerator-wrapped network: forwards and records each call's batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, sample: Tensor, *args, **kwargs):
        self.batches.append(sample.shape[0])
        return self.inner(sample, *args, **kwargs)


# ---- tiny build ------------------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(tiny: StableDiffusionPolicy) -> None:
    rng = torch.get_rng_state()
    again, other = build_tiny_sd(seed=0), build_tiny_sd(seed=1)
    assert torch.equal(rng, torch.get_rng_state()), "building must leave the global RNG alone"
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(tiny, part), getattr(again, part))
        assert not same_weights(getattr(tiny, part), getattr(other, part))


def test_tokenizer_takes_any_prompt_and_tells_prompts_apart() -> None:
    tokenizer = tiny_tokenizer()
    prompts = [*PROMPTS, "ZEBRA, RIDING A BIKE!"]
    ids = tokenizer(prompts, padding="max_length", max_length=32, truncation=True).input_ids
    assert all(len(row) == 32 for row in ids)
    assert ids[0] != ids[1] and ids[2] == ids[3]  # lowercased like CLIP's
    assert tokenizer.unk_token_id not in ids[1][1 : ids[1].index(tokenizer.eos_token_id)]


def test_shapes_and_ranges(tiny: StableDiffusionPolicy) -> None:
    x, cond = inputs(tiny)
    assert tiny.latent_shape == (4, 16, 16)
    assert cond["prompt_embeds"].shape == (3, 32, 32) and not cond["prompt_embeds"].requires_grad
    for timestep in (torch.tensor(981), torch.tensor([981, 500, 1])):
        assert tiny.predict(x, timestep, cond).shape == x.shape
    images = tiny.decode(10 * x)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01


def test_guidance_is_one_batched_call_combining_uncond_and_cond(tiny: StableDiffusionPolicy) -> None:
    x, cond = inputs(tiny)
    t = torch.tensor([981, 500, 1])
    f_u = tiny.forward_network(tiny.network, x, t, tiny.encode_prompts([""] * 3))
    f_c = tiny.forward_network(tiny.network, x, t, cond)
    tiny.network = CountingNetwork(tiny.unet)
    f = tiny.predict(x, t, cond)
    assert tiny.network.batches == [6]
    torch.testing.assert_close(f, f_u + 5.0 * (f_c - f_u), rtol=1e-5, atol=1e-5)


def test_guidance_one_is_a_single_conditional_call() -> None:
    model = build_tiny_sd(seed=0, guidance_scale=1.0)
    x, cond = inputs(model)
    expected = model.forward_network(model.network, x, torch.tensor(500), cond)
    model.network = CountingNetwork(model.unet)
    assert torch.equal(model.predict(x, torch.tensor(500), cond), expected)
    assert model.network.batches == [3]


def test_guidance_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        build_tiny_sd(guidance_scale=0.5)


# ---- trainable weights -----------------------------------------------------------------------


def test_full_fine_tune_trains_the_whole_unet_only(tiny: StableDiffusionPolicy) -> None:
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert trainable == {id(p) for p in tiny.unet.parameters()}
    assert not any(p.requires_grad for m in (tiny.vae, tiny.text_encoder) for p in m.parameters())


def test_lora_trains_only_adapters_and_starts_at_the_base(
    tiny: StableDiffusionPolicy, tiny_lora: StableDiffusionPolicy
) -> None:
    names = [n for n, p in tiny_lora.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert len(tiny_lora.trainable_parameters()) == len(names)
    x, cond = inputs(tiny)
    t = torch.tensor(500)
    assert torch.equal(tiny_lora.predict(x, t, cond), tiny.predict(x, t, cond))


def test_gradients_reach_the_trainable_weights(tiny_lora: StableDiffusionPolicy) -> None:
    x, cond = inputs(tiny_lora)
    tiny_lora.predict(x, torch.tensor([981, 500, 1]), cond).square().mean().backward()
    assert all(p.grad is not None for p in tiny_lora.trainable_parameters())


def perturb(model: StableDiffusionPolicy) -> None:
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_save_and_load_trainable_round_trip(lora: dict | None, tmp_path: Path) -> None:
    trained = build_tiny_sd(seed=0, lora=lora)
    x, cond = inputs(trained)
    before = trained.predict(x, torch.tensor(500), cond)
    perturb(trained)
    after = trained.predict(x, torch.tensor(500), cond)
    assert not torch.allclose(before, after)
    trained.save_trainable(tmp_path / "weights")
    fresh = build_tiny_sd(seed=0, lora=lora)
    fresh.load_trainable(tmp_path / "weights")
    assert torch.equal(fresh.predict(x, torch.tensor(500), cond), after)


def test_lora_files_are_peft_adapter_files(tiny_lora: StableDiffusionPolicy, tmp_path: Path) -> None:
    tiny_lora.save_trainable(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}


def test_loading_lora_weights_of_other_targets_fails_clearly(
    tiny_lora: StableDiffusionPolicy, tmp_path: Path
) -> None:
    tiny_lora.save_trainable(tmp_path)
    other = build_tiny_sd(seed=0, lora={**LORA, "target_modules": ["to_q"]})
    with pytest.raises(ValueError, match=r"do not match model\.lora"):
        other.load_trainable(tmp_path)


def test_unknown_lora_key_is_named() -> None:
    with pytest.raises(ValueError, match="rnak"):
        build_tiny_sd(lora={"rnak": 4})


def test_low_precision_placement_keeps_trained_weights_float32(tiny_lora: StableDiffusionPolicy) -> None:
    tiny_lora.to("cpu", torch.bfloat16)
    assert tiny_lora.dtype == torch.bfloat16
    assert {p.dtype for p in tiny_lora.trainable_parameters()} == {torch.float32}
    frozen = (tiny_lora.vae, tiny_lora.text_encoder, tiny_lora.unet.conv_in)
    assert {next(m.parameters()).dtype for m in frozen} == {torch.bfloat16}
    x, cond = inputs(tiny_lora)
    assert tiny_lora.predict(x, torch.tensor(500), cond).isfinite().all()
    assert tiny_lora.decode(x).dtype == torch.float32


# ---- pipeline folders and load errors ----------------------------------------------------------


def test_saved_pipeline_loads_back_identically(tiny: StableDiffusionPolicy, tmp_path: Path) -> None:
    save_tiny_sd(tmp_path, seed=0)
    assert (tmp_path / "model_index.json").is_file()
    loaded = load_stable_diffusion(str(tmp_path), guidance_scale=5.0)
    assert loaded.latent_shape == tiny.latent_shape  # resolution taken from the saved UNet
    x, cond = inputs(tiny)
    assert torch.equal(loaded.encode_prompts(PROMPTS[:3])["prompt_embeds"], cond["prompt_embeds"])
    assert torch.equal(loaded.predict(x, torch.tensor(500), cond), tiny.predict(x, torch.tensor(500), cond))
    assert torch.equal(loaded.decode(x), tiny.decode(x))
    assert loaded.scheduler.alphas_cumprod.equal(tiny.scheduler.alphas_cumprod)


def test_save_pretrained_refuses_lora(tiny_lora: StableDiffusionPolicy, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="save_trainable"):
        tiny_lora.save_pretrained(tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # diffusers passes a deprecated download argument
def test_offline_uncached_hub_id_names_model_component_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as caught:
        load_stable_diffusion("pcpo-hydra-tests/not-a-cached-model", guidance_scale=5.0)
    message = str(caught.value)
    for part in ("'pcpo-hydra-tests/not-a-cached-model'", "the scheduler", "HF_HUB_OFFLINE",
                 "model.pretrained=", "hf download pcpo-hydra-tests/not-a-cached-model"):
        assert part in message
    assert caught.value.__cause__ is None


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_hub_fails_at_once_unless_the_repo_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"Cannot load model 'someone/flux-like'. Reason: the hub at 127.0.0.1:\d+ is unreachable"):
        check_source("someone/flux-like")
    assert time.perf_counter() - start < 2.0  # refused at once, no retries
    (tmp_path / "models--someone--flux-like").mkdir()
    check_source("someone/flux-like")  # cached before: the libraries load it from the cache
    with socket.socket() as server:  # a hub that answers: no error either
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable() is None


def test_missing_local_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(ModelLoadError, match="no such local directory") as caught:
        load_stable_diffusion(str(missing), guidance_scale=5.0)
    assert str(missing) in str(caught.value) and "hf download" not in str(caught.value)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("vae", "the vae of model .* no vae/ subfolder"),
        ("tokenizer/*", "the tokenizer of model .* no vocabulary"),
    ],
)
def test_missing_component_of_local_dir_is_named(remove: str, message: str, tmp_path: Path) -> None:
    save_tiny_sd(tmp_path)
    for path in tmp_path.glob(remove):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_stable_diffusion(str(tmp_path), guidance_scale=5.0)


def edit_weights(file: Path, edit: str) -> str:
    """Delete one tensor from a saved safetensors file, or add a stray one; returns the key concerned."""
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    if edit == "missing":
        key = sorted(state)[len(state) // 2]  # an inner tensor (e.g. an attention weight), not only the last layer's
        del state[key]
    else:
        key = "stray_block.weight"
        state[key] = torch.zeros(2)
    save_file(state, file, metadata={"format": "pt"})
    return key


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.mark.parametrize("edit", ["missing", "unexpected"])
@pytest.mark.parametrize(("component", "file"), [
    ("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
])
def test_a_pipeline_with_missing_or_unexpected_weights_is_refused(
    saved_sd: Path, tmp_path: Path, component: str, file: str, edit: str
) -> None:
    """diffusers and transformers only warn and initialise missing weights at random: we refuse, naming file and key."""
    shutil.copytree(saved_sd, tmp_path, dirs_exist_ok=True)
    key = edit_weights(tmp_path / component / file, edit)
    with pytest.raises(ModelLoadError) as caught:
        load_stable_diffusion(str(tmp_path), guidance_scale=5.0)
    message = str(caught.value)
    assert f"the {component} (" in message and repr(str(tmp_path / component / file)) in message
    assert f"its weights do not fit the model: {edit} {key}" in message
    assert "Fix: point model.pretrained at a complete checkpoint" in message and "\n" not in message


def test_a_weight_of_another_shape_is_refused_naming_both_shapes(saved_sd: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(saved_sd, tmp_path, dirs_exist_ok=True)
    for component, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        path = tmp_path / component / file
        original = load_file(path)
        key = next(key for key in sorted(original) if key.endswith("norm.bias") or key.endswith("norm1.bias"))
        size = original[key].shape[0]
        save_file(original | {key: torch.zeros(size + 1)}, path, metadata={"format": "pt"})
        with pytest.raises(ModelLoadError) as caught:
            load_stable_diffusion(str(tmp_path), guidance_scale=5.0)
        assert f"the {component} (" in str(caught.value)
        assert f"shapes differ for {key} ({size + 1},) in the file vs ({size},) in the model" in str(caught.value)
        save_file(original, path, metadata={"format": "pt"})


def test_a_clip_checkpoint_lacking_attention_weights_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """The issue's case: a CLIP folder without some attention weights used to load with them random."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel

    shutil.copytree(tiny_clip_dir, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    gone = sorted(key for key in state if ".self_attn.k_proj." in key)
    save_file({key: value for key, value in state.items() if key not in gone}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as caught:
        load_component(CLIPModel, str(tmp_path), "")
    message = str(caught.value)
    assert repr(str(tmp_path / "model.safetensors")) in message and f"missing {gone[0]}, {gone[1]}" in message


def test_declared_optional_keys_pass_and_all_others_count() -> None:
    assert key_mismatch([], ["text_model.embeddings.position_ids"]) is None  # a rebuilt buffer, declared optional
    assert key_mismatch(["a.weight"], ["b", "c", "d", "e", "f"]) == "missing a.weight; unexpected b, c, d, e and 1 more"


def test_package_import_stays_light() -> None:
    code = "import sys, pcpo_hydra.models; assert 'torch' not in sys.modules, 'models imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
