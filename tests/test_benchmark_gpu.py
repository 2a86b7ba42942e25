"""benchmarks/gpu.py stays runnable on a CPU at toy sizes, counts FLOPs that scale, and pins the real configs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import benchmark_module

TOY = ["--size", "toy", "--device", "cpu", "--batch", "2", "--steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def gpu():
    yield from benchmark_module("gpu")


@pytest.fixture(scope="module")
def toy_rows(gpu, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "rows.json"
    return gpu.main([*TOY, "--out", str(out)]), out


def toy_shape(gpu, batch: int) -> object:
    return gpu.Shape(batch, 2, 2, batch, torch.device("cpu"), torch.float32)


def build_toy(gpu, name: str, mode: str, batch: int):
    """(policy, latents, timesteps, cond, shape) of a toy row on the CPU, seeded."""
    torch.manual_seed(0)
    shape = toy_shape(gpu, batch)
    policy, settings = gpu.build_policy(name, "toy", mode)
    policy.to(shape.device, shape.dtype)
    return (policy, *gpu.make_inputs(policy, name, "toy", settings, shape), shape)


def test_every_toy_row_prints_finite_positive_figures(toy_rows, capsys):
    rows, out = toy_rows
    assert [(r.network, r.mode) for r in rows] == [(n, m) for n in ("sd15", "sd35_medium", "flux") for m in ("lora", "full")]
    for row in rows:
        assert row.status == "ok", row
        for value in (row.images_per_s, row.rollout_s, row.update_s, row.epoch_tflops, row.peak_memory_gb):
            assert math.isfinite(value) and value > 0, row
        assert math.isnan(row.peak_share)  # no bf16 peak on a CPU: n/a, not a made-up share
    assert '"images_per_s"' in out.read_text()


def test_toy_table_names_every_row_and_says_what_memory_is(gpu, capsys):
    rows = gpu.main([*TOY, "--networks", "flux", "--modes", "lora"])
    printed = capsys.readouterr().out
    assert "| flux | lora |" in printed and "n/a |" in printed
    assert "process max RSS so far (CPU)" in printed
    assert rows[0].images_per_s > 0


@pytest.mark.parametrize("name", ["sd15", "sd35_medium", "flux"])
def test_flops_of_a_toy_call_are_positive_and_scale_with_the_batch(gpu, name):
    counts = {}
    for batch in (1, 2):
        policy, latents, timesteps, cond, shape = build_toy(gpu, name, "lora", batch)
        counts[batch] = gpu.count_flops(policy, latents, timesteps, cond, shape)
    for one, two in zip(counts[1], counts[2]):
        assert one > 0
        assert two == pytest.approx(2 * one, rel=0.01)
    rollout_call, train_call = counts[1]
    assert train_call > rollout_call / 2  # forward + backward of one unguided-doubled batch vs one guided forward


def test_cpu_attention_is_counted(gpu):
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=gpu.cpu_attention_flops()) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * 2 * 2 * 4 * 64 * 64 * 16  # two matmuls of B x H x L x L x D multiply-adds
    assert counter.get_total_flops() == forward + 2.5 * forward  # backward: five such matmuls


@pytest.mark.parametrize("name", ["sd15", "sd35_medium", "flux"])
def test_lora_trains_only_its_adapters_and_the_update_moves_them(gpu, name):
    policy, latents, timesteps, cond, shape = build_toy(gpu, name, "lora", 2)
    trained = {n: p for n, p in policy.network.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in policy.network.named_parameters() if not p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    full_trainable = sum(p.numel() for p in build_toy(gpu, name, "full", 2)[0].network.parameters() if p.requires_grad)
    assert sum(p.numel() for p in trained.values()) < full_trainable
    before = {n: p.detach().clone() for n, p in policy.network.named_parameters()}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    seen = gpu.rollout(policy, latents, timesteps, cond, shape)
    gpu.update(policy, seen, timesteps, cond, optimizer, shape)
    assert any(not torch.equal(before[n], p) for n, p in trained.items())
    assert all(torch.equal(before[n], p) for n, p in frozen.items())


def test_full_fine_tuning_moves_the_network_weights(gpu):
    policy, latents, timesteps, cond, shape = build_toy(gpu, "sd35_medium", "full", 2)
    before = {n: p.detach().clone() for n, p in policy.network.named_parameters()}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    gpu.update(policy, gpu.rollout(policy, latents, timesteps, cond, shape), timesteps, cond, optimizer, shape)
    assert sum(not torch.equal(before[n], p) for n, p in policy.network.named_parameters()) > len(before) // 2


# Published sizes: SD v1 "an 860M UNet" (CompVis/stable-diffusion README); FLUX.1 [dev] "a 12 billion
# parameter rectified flow transformer" (black-forest-labs/FLUX.1-dev model card); SD3.5 Medium
# "2.5 billion parameters" (stabilityai/stable-diffusion-3.5-medium model card), which counts the
# transformer's fixed 384 x 384 x 1536 sin-cos position table (a buffer in diffusers) beside its
# 2.24B parameters.
@pytest.mark.parametrize(("name", "published", "with_buffers"), [
    ("sd15", 860e6, False), ("sd35_medium", 2.5e9, True), ("flux", 12e9, False),
])
def test_real_configs_build_on_meta_with_the_published_sizes(gpu, name, published, with_buffers):
    with torch.device("meta"):
        network = gpu.build_network(name, "real")
    params = sum(p.numel() for p in network.parameters())
    assert params == pytest.approx(gpu.NETWORKS[name].known_params, rel=1e-3)
    size = params + (sum(b.numel() for b in network.buffers()) if with_buffers else 0)
    assert size == pytest.approx(published, rel=0.02)


def test_real_lora_rows_train_the_conf_rank_and_far_fewer_weights(gpu):
    for name in gpu.NETWORKS:
        params, lora = gpu.parameter_counts(name, "real", "lora")
        _, full = gpu.parameter_counts(name, "real", "full")
        assert full == pytest.approx(gpu.NETWORKS[name].known_params, rel=1e-3)
        assert 0 < lora < 0.05 * full < params


def test_real_configs_run_the_project_forward_on_meta(gpu):
    """Text widths, token counts and latents of the real configs fit the networks (no memory, no GPU)."""
    shape = gpu.Shape(1, 1, 1, 1, torch.device("cpu"), torch.float32)
    rollout_call = {name: gpu.flops_on_meta(name, "lora", "real", shape)[0] for name in gpu.NETWORKS}
    # A guided SD3.5-M call on 1024 image + 333 text tokens costs more than SD-1.5's; FLUX's
    # unguided call on 2025 + 512 tokens through 12B parameters costs the most.
    assert 0 < rollout_call["sd15"] < rollout_call["sd35_medium"] < rollout_call["flux"]
    assert rollout_call["flux"] == pytest.approx(38.4e12, rel=0.05)  # ~2 x 10.8B per-token weights x tokens


def test_a_row_that_cannot_fit_is_skipped_before_it_is_built(gpu, monkeypatch):
    monkeypatch.setattr(gpu, "device_memory", lambda device: 80e9)
    row = gpu.measure("flux", "full", "real", toy_shape(gpu, 1), None)
    assert row.status.startswith("skipped: needs ~190 GB")
    assert gpu.bytes_needed(row.params, 0, torch.bfloat16) == pytest.approx(2 * 11.9e9, rel=0.01)


def test_the_peak_comes_from_the_flag_the_name_or_a_request_for_the_flag(gpu, monkeypatch):
    cuda = torch.device("cuda")
    assert gpu.lookup_peak_tflops(torch.device("cpu"), None) is None
    assert gpu.lookup_peak_tflops(cuda, 500.0) == 500.0
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert gpu.lookup_peak_tflops(cuda, None) == tflops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    with pytest.raises(SystemExit, match="--peak-tflops"):
        gpu.lookup_peak_tflops(cuda, None)
