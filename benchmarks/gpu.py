"""One GPU, real-sized networks: images/s, seconds per phase, peak memory and the share of the bf16 peak.

    python benchmarks/gpu.py --size toy --device cpu      # CI: every row at toy sizes, seconds on a CPU
    python benchmarks/gpu.py --batch 8 --steps 10 --train-batch 2 --out gpu.json   # one H100 or H200
    python benchmarks/gpu.py --flops-only --device cpu --batch 8 --steps 10 --train-batch 2   # FLOPs, no GPU

The H100/H200 line is sized (by FLOP count, at ~40% of the bf16 peak: ~1 s, ~4 s and ~25 s per
epoch for SD-1.5, SD3.5-M and FLUX LoRA) to run its six rows, each a warm-up and a measured epoch,
in a few minutes; FLUX full is skipped (~190 GB). The micro-batch of 2 keeps the update's
activations (the guided models double it to 4) beside SD3.5-M's 36 GB of full fine-tuning
states; a row that still runs out of memory says so: rerun it with `--gradient-checkpointing`.

Networks: the SD-1.5 `UNet2DConditionModel`, the SD3.5-Medium `SD3Transformer2DModel` and the
FLUX.1-dev `FluxTransformer2DModel`, each built from its published config (written below, with
where it comes from) with random weights: nothing is downloaded, and a network's speed does not
depend on its weights' values. `--size toy` shrinks every config (few layers, small widths) so the
same code runs in seconds on a CPU and cannot rot.

Each network is wrapped in the project's own policy class (StableDiffusionPolicy, SD3Policy,
FluxPolicy) with the LoRA rank, alpha, targets, resolution, guidance and T5 length of its
conf/model/*.yaml, so the calls timed are the project's: `PolicyModel.predict` (classifier-free
guidance on one doubled batch where the model uses it: SD and SD3 yes, FLUX no, it embeds its
distilled guidance), each family's `forward_network` (FLUX's packing, ids and timestep units) and
`TrainableWeights` (frozen weights in bf16, trained ones in float32, autocast in bf16, as
hardware=gpu1 runs). The text encoders and VAE around it are tiny stand-ins that never run: the
text embeddings are random tensors of the real encoders' shapes (SD-1.5: 77 x 768 CLIP; SD3.5:
77 CLIP-L|G + T5 tokens x 4096 and 2048 pooled; FLUX: T5 tokens x 4096 and 768 pooled CLIP),
put in the policy's text cache, which is how training runs with offload_text_encoders. The VAE
decode, the reward and the sampler's arithmetic are left out: this measures the denoiser.

One epoch, shaped like the training loop's (rollout without grad, then update):
  rollout  `--steps` guided predictions on `--batch` latents under no_grad (an Euler step between)
  update   at each of `--train-steps` trained steps, the prediction again with grad, in micro-batches
           of `--train-batch`, backward on a stand-in loss (mean square), then one fused AdamW step
Modes: `lora` (peft adapters, the conf's rank) and `full` (every weight trains, float32 master
weights + AdamW states: 16 bytes per parameter). A row whose weights, gradients and optimizer
states alone exceed the device's memory is skipped with the estimate, before anything is built
(FLUX full fine-tuning: ~190 GB); a row that runs out of memory later says so. The project has
no 8-bit optimizer, so none is used here.

Printed per (network, mode): images/s of the epoch (after one unmeasured warm-up epoch),
seconds of rollout and update, peak memory (torch.cuda.max_memory_allocated; on a CPU the
process's max RSS so far, from getrusage) and the share of the device's peak bf16 FLOP/s. FLOPs
per network call come from torch.utils.flop_counter.FlopCounterMode on the warm-up (one guided
prediction; one forward+backward of a micro-batch), times the calls of the epoch. The peak is
`--peak-tflops`, or looked up by device name (dense bf16, no sparsity: H100 SXM / H200 989,
H100 NVL 835, H100 PCIe 756, A100 312); an unknown GPU needs the flag; on a CPU it is n/a.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("lora", "full")
CLIP_TOKENS = 77           # CLIP's context: SD-1.5's text, SD3's CLIP-L|G part of the sequence
VAE_FACTOR = 8             # every one of these models' VAEs downsamples by 8
FULL_BYTES_PER_PARAM = 16  # float32 weight + gradient + AdamW's two moments
PEAK_TFLOPS = (            # dense bf16 tensor-core peaks (NVIDIA data sheets); first match of the name wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
)

# ---- the networks: real configs, toy configs ---------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (the CompVis v1 UNet: 859.5M parameters).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "norm_num_groups": 32,
}
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in blocks 0-12).
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev, transformer/config.json (19 double- and 38 single-stream blocks of 3072).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}

# Toy sizes: the same block types (cross-attention, dual attention, both FLUX streams), so every
# LoRA target of the conf exists; text widths shrink with the networks.
TOY_SD15_UNET = {**SD15_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 64),
                 "cross_attention_dim": 32, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "norm_num_groups": 8}
TOY_SD35_MEDIUM_TRANSFORMER = {**SD35_MEDIUM_TRANSFORMER, "sample_size": 8, "num_layers": 2, "attention_head_dim": 16,
                               "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 32,
                               "pooled_projection_dim": 32, "pos_embed_max_size": 8, "dual_attention_layers": (0,)}
TOY_FLUX_DEV_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                            "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                            "axes_dims_rope": (4, 6, 6)}
TOY_RESOLUTION = 64        # pixels: 8x8 latents
TOY_TOKENS = 8             # CLIP and T5 tokens at toy size
TOY_LORA_RANK = 4          # the conf's ranks (up to 128) would outgrow toy widths of 32; alpha / rank is kept


@dataclass(frozen=True)
class Network:
    """One network of the benchmark: its conf/model option, its configs, and how to wrap it in its policy."""

    name: str                   # also the conf/model/<name>.yaml its settings come from
    real: dict[str, Any]
    toy: dict[str, Any]
    known_params: float         # parameters of the real config (what the tests pin)

    def config(self, size: str) -> dict[str, Any]:
        return self.real if size == "real" else self.toy


NETWORKS = {
    "sd15": Network("sd15", SD15_UNET, TOY_SD15_UNET, 859.52e6),
    "sd35_medium": Network("sd35_medium", SD35_MEDIUM_TRANSFORMER, TOY_SD35_MEDIUM_TRANSFORMER, 2.2432e9),
    "flux": Network("flux", FLUX_DEV_TRANSFORMER, TOY_FLUX_DEV_TRANSFORMER, 11.9014e9),
}


def model_settings(name: str) -> dict[str, Any]:
    """conf/model/<name>.yaml as a dict: the one source of resolution, guidance, T5 length and LoRA."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_container(node, resolve=False)


def build_network(name: str, size: str) -> torch.nn.Module:
    """The bare diffusers network at `size` (on the current default device and dtype)."""
    import pcpo_hydra  # noqa: F401  (its root makes torchvision import beside CPU torch, before diffusers)
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"sd15": UNet2DConditionModel, "sd35_medium": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[name]
    return cls(**NETWORKS[name].config(size))


def _vae(latent_channels: int, resolution: int):
    """A stand-in VAE that never runs: only its downsampling factor (8) and channels matter to the policy."""
    from pcpo_hydra.models.tiny import tiny_vae

    return tiny_vae(resolution, latent_channels=latent_channels, block_out_channels=(4,) * 4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_policy(name: str, size: str, mode: str, gradient_checkpointing: bool = False):
    """The project's policy around a random network of `size`, with stand-in (never run) text encoders and VAE.

    Returns (policy, settings): settings are the conf's, with the resolution and token counts used here.
    """
    import pcpo_hydra  # noqa: F401
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pcpo_hydra.models.tiny import SD_SCHEDULE, tiny_clip_text_config, tiny_t5_encoder, tiny_t5_tokenizer, tiny_tokenizer

    settings = model_settings(name)
    if size == "toy":
        rank = min(settings["lora"]["rank"], TOY_LORA_RANK)
        alpha = settings["lora"]["alpha"] * rank / settings["lora"]["rank"]
        settings.update(resolution=TOY_RESOLUTION, max_sequence_length=TOY_TOKENS)
        settings["lora"].update(rank=rank, alpha=alpha)
    lora = {**settings["lora"], "enabled": mode == "lora"}
    network = build_network(name, size)
    common = {"resolution": settings["resolution"], "guidance_scale": settings["guidance_scale"], "lora": lora,
              "gradient_checkpointing": gradient_checkpointing}
    with torch.device("cpu"):  # the stand-ins stay small and off the GPU's count
        tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
        clip, t5 = CLIPTextModel(tiny_clip_text_config(tokenizer)), tiny_t5_encoder(t5_tokenizer)
    if name == "sd15":
        from pcpo_hydra.models.stable_diffusion import StableDiffusionPolicy

        policy = StableDiffusionPolicy(network, _vae(4, settings["resolution"]), clip, tokenizer,
                                       DDIMScheduler(**SD_SCHEDULE), **common)
    elif name == "sd35_medium":
        from pcpo_hydra.models.sd3 import SD3Policy
        from pcpo_hydra.models.tiny_sd3 import SD35_SCHEDULER

        clip_l = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))
        policy = SD3Policy(network, _vae(16, settings["resolution"]), (clip_l, clip_l, t5),
                           (tokenizer, tokenizer, t5_tokenizer), FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
                           max_sequence_length=settings["max_sequence_length"], **common)
    else:
        from pcpo_hydra.models.flux import FluxPolicy
        from pcpo_hydra.models.tiny_flux import FLUX_SCHEDULE

        policy = FluxPolicy(network, _vae(16, settings["resolution"]), clip, tokenizer, t5, t5_tokenizer,
                            FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE), guidance=settings["guidance"],
                            max_sequence_length=settings["max_sequence_length"], **common)
    return policy, settings


def text_shapes(name: str, size: str, settings: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-prompt shapes of the conditioning the real text encoders produce (what encode_prompts returns)."""
    clip_tokens = CLIP_TOKENS if size == "real" else TOY_TOKENS
    if name == "sd15":  # CLIP-L's last hidden state
        return {"prompt_embeds": (clip_tokens, config["cross_attention_dim"])}
    t5_tokens = settings["max_sequence_length"]
    if name == "sd35_medium":  # CLIP-L|G states padded to T5's width, then T5's tokens; pooled CLIP-L|G
        return {"prompt_embeds": (clip_tokens + t5_tokens, config["joint_attention_dim"]),
                "pooled_prompt_embeds": (config["pooled_projection_dim"],)}
    return {"prompt_embeds": (t5_tokens, config["joint_attention_dim"]),  # FLUX: T5 states; CLIP's pooled output
            "pooled_prompt_embeds": (config["pooled_projection_dim"],)}


# ---- measuring ---------------------------------------------------------------------------------


@dataclass
class Row:
    """The figures of one (network, mode): what is printed and written to --out."""

    network: str
    mode: str
    status: str = "ok"                 # ok, or why the row has no figures
    params: int = 0
    trainable_params: int = 0
    images_per_s: float = math.nan
    rollout_s: float = math.nan
    update_s: float = math.nan
    peak_memory_gb: float = math.nan
    memory_kind: str = ""
    flops_per_rollout_call: float = math.nan
    flops_per_train_call: float = math.nan
    epoch_tflops: float = math.nan
    achieved_tflops: float = math.nan
    peak_share: float = math.nan       # achieved / the device's bf16 peak; nan where unknown (CPU)
    shapes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """The epoch: batch and calls; device and dtype."""

    batch: int
    steps: int
    train_steps: int
    train_batch: int
    device: torch.device
    dtype: torch.dtype

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.batch / self.train_batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(shape: Shape):
    """What hardware=gpu1's accelerator does: autocast in bf16 (nothing in float32)."""
    if shape.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(shape.device.type, dtype=shape.dtype)


@contextmanager
def _born(device: torch.device, dtype: torch.dtype):
    """Build parameters on `device` in `dtype` directly: FLUX in float32 on the host would take 48 GB and minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def make_inputs(policy, name: str, size: str, settings: dict[str, Any], shape: Shape):
    """(latents, timesteps, conditioning) of one epoch; the empty prompt's embedding goes into the text cache."""
    config = NETWORKS[name].config(size)
    text = text_shapes(name, size, settings, config)
    generator = None if shape.device.type == "meta" else torch.Generator(shape.device).manual_seed(0)

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(dims, generator=generator, device=shape.device)

    empty = torch.Generator().manual_seed(1)  # the cache keeps its entries on the host (meta has no data)
    policy.text_cache.store("", {key: torch.randn(dims, generator=empty) for key, dims in text.items()})
    cond = {key: randn(shape.batch, *dims) for key, dims in text.items()}
    latents = randn(shape.batch, *policy.latent_shape)
    timesteps = torch.linspace(1000.0, 0.0, shape.steps + 1, device=shape.device)[:-1]  # the sampler's units
    return latents, timesteps, cond


def rollout(policy, latents: torch.Tensor, timesteps: torch.Tensor, cond, shape: Shape) -> list[torch.Tensor]:
    """`steps` guided predictions without grad; the latents each step saw (what the update recomputes at)."""
    seen = []
    dt = 1.0 / len(timesteps)
    with torch.no_grad(), _autocast(shape):
        for t in timesteps:
            seen.append(latents)
            latents = latents - dt * policy.predict(latents, t, cond).float()
    return seen


def update(policy, seen: list[torch.Tensor], timesteps: torch.Tensor, cond, optimizer, shape: Shape) -> None:
    """Each trained step's prediction again with grad, in micro-batches; then one AdamW step."""
    for k in range(shape.train_steps):
        for start in range(0, shape.batch, shape.train_batch):
            part = slice(start, start + shape.train_batch)
            with _autocast(shape):
                out = policy.predict(seen[k][part], timesteps[k], {key: v[part] for key, v in cond.items()})
            out.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cpu_attention_flops() -> dict[Any, Any]:
    """FlopCounterMode formulas for the CPU's fused attention, which it does not count by itself (the CUDA
    kernels, flash, memory-efficient and cuDNN, it does): the same formulas as theirs."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *_, out_val=None, **__) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *_, out_val=None, **__) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(policy, latents, timesteps, cond, shape: Shape) -> tuple[float, float]:
    """FLOPs of one rollout call (a guided prediction on the batch) and one train call (forward + backward
    of a micro-batch), counted by FlopCounterMode; the calls also warm the device up."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter, torch.no_grad(), \
            _autocast(shape):
        policy.predict(latents, timesteps[0], cond)
    per_rollout = counter.get_total_flops()
    part = slice(0, shape.train_batch)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        with _autocast(shape):
            out = policy.predict(latents[part], timesteps[0], {key: v[part] for key, v in cond.items()})
        out.float().square().mean().backward()
    policy.network.zero_grad(set_to_none=True)
    return float(per_rollout), float(counter.get_total_flops())


def epoch_flops(per_rollout: float, per_train: float, shape: Shape) -> float:
    """Rollout calls x their FLOPs + train calls x theirs (a last, smaller micro-batch counted as full)."""
    return shape.steps * per_rollout + shape.train_steps * shape.micro_batches * per_train


def flops_on_meta(name: str, mode: str, size: str, shape: Shape) -> tuple[float, float]:
    """`count_flops` of the row on the meta device: real-size FLOPs per call without memory or a GPU.

    It also runs every shape of the real configs (text widths, token counts, latents) through the
    project's forward code, so a wrong number in a config fails here rather than on a lent GPU.
    """
    meta = Shape(shape.batch, 1, 1, shape.train_batch, torch.device("meta"), torch.float32)
    with meta.device:
        policy, settings = build_policy(name, size, mode)
    latents, timesteps, cond = make_inputs(policy, name, size, settings, meta)
    return count_flops(policy, latents, timesteps, cond, meta)


def parameter_counts(name: str, size: str, mode: str) -> tuple[int, int]:
    """(all, trainable) parameters, counted on the meta device: no memory, a second or two."""
    with torch.device("meta"):
        policy, _ = build_policy(name, size, mode)
    params = list(policy.network.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def bytes_needed(params: int, trainable: int, dtype: torch.dtype) -> float:
    """Weights, gradients and AdamW states, before any activation: frozen in `dtype`, trained float32 + 12 B."""
    frozen = params - trainable
    return frozen * torch.finfo(dtype).bits / 8 + trainable * FULL_BYTES_PER_PARAM


def device_memory(device: torch.device) -> float | None:
    """Bytes of the accelerator's memory; None on a CPU (no check there)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GB, what it is): the CUDA allocator's peak since the row began, or the process's max RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "process max RSS so far (CPU)"  # KiB on Linux


def measure(name: str, mode: str, size: str, shape: Shape, peak_tflops: float | None,
            gradient_checkpointing: bool = False) -> Row:
    """One row: build, skip if it cannot fit, count FLOPs on a warm-up epoch, time one epoch."""
    row = Row(name, mode)
    row.params, row.trainable_params = parameter_counts(name, size, mode)
    total = device_memory(shape.device)
    need = bytes_needed(row.params, row.trainable_params, shape.dtype)
    if total is not None and need > total:
        row.status = (f"skipped: needs ~{need / 1e9:.0f} GB for weights, gradients and AdamW states alone "
                      f"(device has {total / 1e9:.0f} GB)")
        return row
    if shape.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(shape.device)
    try:
        with _born(shape.device, shape.dtype):
            policy, settings = build_policy(name, size, mode, gradient_checkpointing)
        policy.to(shape.device, shape.dtype)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4, fused=shape.device.type == "cuda")
        latents, timesteps, cond = make_inputs(policy, name, size, settings, shape)
        row.shapes = {"latent": list(policy.latent_shape), "resolution": settings["resolution"],
                      "guidance_scale": settings["guidance_scale"],
                      **{key: list(v.shape[1:]) for key, v in cond.items()}}
        row.flops_per_rollout_call, row.flops_per_train_call = count_flops(policy, latents, timesteps, cond, shape)
        update(policy, rollout(policy, latents, timesteps, cond, shape), timesteps, cond, optimizer, shape)  # warm-up
        _sync(shape.device)
        started = time.perf_counter()
        seen = rollout(policy, latents, timesteps, cond, shape)
        _sync(shape.device)
        middle = time.perf_counter()
        update(policy, seen, timesteps, cond, optimizer, shape)
        _sync(shape.device)
        ended = time.perf_counter()
    except torch.OutOfMemoryError:
        row.status = "out of memory (--batch / --train-batch smaller, or --gradient-checkpointing)"
        return row
    finally:
        policy = optimizer = latents = cond = seen = None  # noqa: F841  (free the row before the next)
        gc.collect()
        if shape.device.type == "cuda":
            torch.cuda.empty_cache()
    row.rollout_s, row.update_s = middle - started, ended - middle
    row.images_per_s = shape.batch / (ended - started)
    row.peak_memory_gb, row.memory_kind = peak_memory(shape.device)
    row.epoch_tflops = epoch_flops(row.flops_per_rollout_call, row.flops_per_train_call, shape) / 1e12
    row.achieved_tflops = row.epoch_tflops / (ended - started)
    if peak_tflops:
        row.peak_share = row.achieved_tflops / peak_tflops
    return row


# ---- the command -------------------------------------------------------------------------------


def lookup_peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The flag, else the table by device name; None on a CPU; an unknown GPU names the flag to set."""
    if given is not None or device.type != "cuda":
        return given
    gpu = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in gpu:
            return tflops
    raise SystemExit(f"no bf16 peak known for {gpu!r}: pass --peak-tflops <dense bf16 TFLOP/s of this GPU>")


def _count(n: int) -> str:
    """A parameter count readable at toy and real sizes: 1.2k, 3.4M, 11.9B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(rows: list[Row]) -> None:
    """The table: one line per (network, mode)."""
    print("| network | mode | trainable / all params | images/s | rollout s | update s | peak memory GB "
          "| TFLOP per epoch | achieved TFLOP/s | share of bf16 peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = f"{_count(r.trainable_params)} / {_count(r.params)}"
        if r.status != "ok":
            print(f"| {r.network} | {r.mode} | {params} | {r.status} | | | | | | |")
            continue
        print(f"| {r.network} | {r.mode} | {params} | {r.images_per_s:.3g} | {r.rollout_s:.3g} | {r.update_s:.3g} "
              f"| {r.peak_memory_gb:.3g} | {r.epoch_tflops:.3g} | {r.achieved_tflops:.3g} "
              f"| {_fmt(r.peak_share, '.1%')} |")
    kinds = {r.memory_kind for r in rows if r.memory_kind}
    if kinds:
        print(f"peak memory: {', '.join(sorted(kinds))}")


def report_flops(networks: list[str], modes: list[str], size: str, shape: Shape) -> list[Row]:
    """--flops-only: FLOPs per rollout call, per train call and per epoch of each row, counted on meta."""
    print("| network | mode | TFLOP per rollout call | TFLOP per train call | TFLOP per epoch |")
    print("|---|---|---|---|---|")
    rows = []
    for network in networks:
        for mode in modes:
            row = Row(network, mode, status="flops only")
            row.flops_per_rollout_call, row.flops_per_train_call = flops_on_meta(network, mode, size, shape)
            row.epoch_tflops = epoch_flops(row.flops_per_rollout_call, row.flops_per_train_call, shape) / 1e12
            rows.append(row)
            print(f"| {network} | {mode} | {row.flops_per_rollout_call / 1e12:.4g} "
                  f"| {row.flops_per_train_call / 1e12:.4g} | {row.epoch_tflops:.4g} |", flush=True)
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("real", "toy"), default="real", help="published configs, or toy ones")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="frozen weights and autocast (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--networks", nargs="+", choices=tuple(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=4, help="images per epoch (the rollout batch)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of the rollout")
    parser.add_argument("--train-steps", type=int, default=None, help="trained steps per image (default: all)")
    parser.add_argument("--train-batch", type=int, default=None, help="update micro-batch (default: --batch)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as model.gradient_checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 TFLOP/s")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--flops-only", action="store_true",
                        help="count FLOPs per call on the meta device (no GPU, no memory), print them and stop")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.train_steps is not None and not 0 < args.train_steps <= args.steps:
        parser.error(f"--train-steps must be in 1..--steps ({args.steps})")
    return args


def main(argv: list[str]) -> list[Row]:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(args.batch, args.steps, args.train_steps or args.steps, args.train_batch or args.batch, device, dtype)
    peak = lookup_peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, {args.size} sizes, {dtype}, batch {shape.batch}, "
          f"{shape.steps} rollout steps, {shape.train_steps} trained steps in micro-batches of {shape.train_batch}, "
          f"bf16 peak {_fmt(peak, '.0f')} TFLOP/s", flush=True)
    if args.flops_only:
        return report_flops(args.networks, args.modes, args.size, shape)
    rows = []
    for network in args.networks:
        for mode in args.modes:
            rows.append(measure(network, mode, args.size, shape, peak, args.gradient_checkpointing))
            r = rows[-1]
            print(f"{network} {mode}: {r.status if r.status != 'ok' else f'{r.images_per_s:.3g} images/s'}", flush=True)
    report(rows)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": [asdict(r) for r in rows]}, indent=1))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
