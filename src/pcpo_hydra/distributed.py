"""Process setup through Accelerate: device, mixed precision, gradient accumulation, seeding."""

from __future__ import annotations

import random

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig

_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_accelerator(hardware: DictConfig, gradient_accumulation_steps: int) -> Accelerator:
    """One Accelerator for the run; it owns the device, autocast and accumulation boundaries."""
    if hardware.num_threads is not None:
        torch.set_num_threads(hardware.num_threads)
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hardware.device='cuda' but no CUDA device is visible; use hardware=cpu")
    return Accelerator(
        cpu=hardware.device == "cpu",
        mixed_precision=hardware.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )


def weight_dtype(hardware: DictConfig) -> torch.dtype:
    """dtype of frozen weights (VAE, text encoder, LoRA base); trainable weights stay float32."""
    return _WEIGHT_DTYPES[hardware.mixed_precision]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; each rank gets its own stream of the same seed family."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
