"""DDPO's JPEG rewards: the size of the image as a quality-95 JPEG, in kilobytes.

Compressibility (minus the size) drives images towards flat, simple ones; incompressibility
(plus the size) towards busy, detailed ones. Both need no model weights, which makes them the
rewards of the CPU-only default run.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from pcpo_hydra.images import to_pil
from pcpo_hydra.rewards.base import BaseReward


def jpeg_size_kb(image: Image.Image, quality: int) -> float:
    """Encoded JPEG size in kB (bytes / 1000, as DDPO counts it)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegSize(BaseReward):
    """sign * JPEG size in kB of each image, converted to 8-bit RGB by round(x * 255)."""

    sign: float  # -1: reward small files, +1: reward large files

    def __init__(self, batch_size: int = 32, quality: int = 95) -> None:
        super().__init__(batch_size)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        sizes = [jpeg_size_kb(image, self.quality) for image in to_pil(images)]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(JpegSize):
    """Minus the JPEG size: smaller files score higher."""

    name = "jpeg_compressibility"
    sign = -1.0


class JpegIncompressibility(JpegSize):
    """The JPEG size: larger files score higher."""

    name = "jpeg_incompressibility"
    sign = 1.0
