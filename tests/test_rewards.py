"""Rewards: DDPO's JPEG sizes exactly, and the input checks and batching every reward inherits."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.jpeg import JpegCompressibility, JpegIncompressibility


def noise(count: int = 2, size: int = 64) -> Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_flat_grey_is_more_compressible_than_noise() -> None:
    images = torch.cat([torch.full((1, 3, 64, 64), 0.5), noise(1)])
    grey, random = JpegCompressibility()(images, ["a", "b"]).tolist()
    assert grey > random


def test_size_is_pils_own_quality_95_encode_in_kilobytes() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    expected_kb = len(buffer.getvalue()) / 1000
    images = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    reward = JpegIncompressibility()(images, ["a"])
    assert reward.dtype == torch.float32 and reward.shape == (1,)
    assert reward.item() == pytest.approx(expected_kb, abs=1e-6)


def test_compressibility_is_minus_incompressibility() -> None:
    images = noise(3)
    prompts = ["a"] * 3
    assert torch.equal(JpegCompressibility()(images, prompts), -JpegIncompressibility()(images, prompts))


def test_quality_changes_the_score() -> None:
    images = noise(1)
    assert JpegIncompressibility(quality=50)(images, ["a"]) < JpegIncompressibility(quality=95)(images, ["a"])


class Recorder(BaseReward):
    """Mean pixel value; records each batch size and whether autograd was on."""

    name = "recorder"

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size)
        self.calls: list[tuple[int, bool]] = []

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.calls.append((len(prompts), torch.is_grad_enabled()))
        return images.mean(dim=(1, 2, 3)).double()


class OneTooMany(BaseReward):
    name = "one_too_many"

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return torch.zeros(len(prompts) + 1)


def test_batches_split_in_order_without_grad_and_come_back_float32() -> None:
    images = torch.rand(7, 3, 8, 8, requires_grad=True)
    reward = Recorder(batch_size=3)
    scores = reward(images, [str(i) for i in range(7)])
    assert reward.calls == [(3, False), (3, False), (1, False)]
    assert scores.dtype == torch.float32 and not scores.requires_grad
    assert torch.allclose(scores, images.detach().mean(dim=(1, 2, 3)))


def test_a_score_of_the_wrong_length_names_the_reward_class() -> None:
    with pytest.raises(RuntimeError, match=r"OneTooMany.score returned shape \(3,\) for 2 images"):
        OneTooMany()(torch.rand(2, 3, 8, 8), ["a", "b"])


@pytest.mark.parametrize(
    ("images", "prompts", "message"),
    [
        (torch.rand(3, 8, 8), ["a"], r"\[B, 3, H, W\]"),
        (torch.rand(1, 4, 8, 8), ["a"], r"\[B, 3, H, W\]"),
        (torch.rand(0, 3, 8, 8), [], "empty batch"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), ["a"], "floats"),
        (torch.rand(2, 3, 8, 8), ["a"], "1 prompts for 2 images"),
        (torch.full((1, 3, 8, 8), 1.5), ["a"], r"\[0, 1\]"),
        (torch.full((1, 3, 8, 8), -0.5), ["a"], r"\[0, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), ["a"], "NaN"),
    ],
)
def test_invalid_inputs_raise_clear_errors(images: Tensor, prompts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JpegCompressibility()(images, prompts)


def test_values_a_rounding_step_outside_the_range_are_accepted() -> None:
    images = torch.full((1, 3, 8, 8), 1.0 + 1e-6)
    assert JpegCompressibility()(images, ["a"]).shape == (1,)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"batch_size": 0}, "batch_size"), ({"quality": 0}, "quality")]
)
def test_bad_constructor_arguments_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JpegCompressibility(**kwargs)


def test_importing_the_package_stays_light() -> None:
    code = "import sys, pcpo_hydra.rewards; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
