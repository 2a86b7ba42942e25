"""Every conversion between the loop's float images and 8-bit pixels, written once.

The loop's images are float [B, 3, H, W] in [0, 1]. Rewards, the reward server and the sample grids
all need 8-bit RGB pixels (PIL images or uint8 arrays) and back; one rounding rule, round(x * 255),
and one way back, k / 255, keep a reward's score the same whether it runs in the trainer or behind
`pcpo-reward-server`, and keep the grid's pixels the ones the rewards saw.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def check_images(images: Tensor) -> None:
    """Raise ValueError unless `images` is a non-empty float [B, 3, H, W] batch."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")


def from_signed(images: Tensor) -> Tensor:
    """A VAE's output in [-1, 1] -> float32 images in [0, 1] (clamped: decoders overshoot a little)."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 via round(x * 255), DDPO's conversion."""
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """One 8-bit RGB PIL image per batch element."""
    return [Image.fromarray(array) for array in to_uint8(images)]


def unit_float(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels (any shape, channels last) -> float32 in [0, 1], pixel k at k / 255 (ToTensor's scaling)."""
    return pixels.astype(np.float32) / 255


def from_uint8(pixels: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1], the inverse of `to_uint8` on its pixels."""
    return torch.from_numpy(unit_float(pixels)).permute(0, 3, 1, 2)
