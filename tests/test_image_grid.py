"""Sample grids: layout from the batch shape, exact enlarged pixels, captions that fit their tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from pcpo_hydra.image_grid import ELLIPSIS, MIN_TILE, make_grid, wrap_caption
from pcpo_hydra.images import to_uint8


def tile_pixels(grid: Image.Image, index: int, columns: int, rows: int, tile: int) -> np.ndarray:
    """The tile area of image `index`; each row of the grid is a tile plus its caption band."""
    cell_h = grid.height // rows
    x, y = (index % columns) * tile, (index // columns) * cell_h
    return np.asarray(grid)[y : y + tile, x : x + tile]


def test_tiny_images_are_enlarged_by_a_whole_factor_and_laid_out_in_rows() -> None:
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grid = make_grid(images, [f"prompt {i} | {i / 10:.3g}" for i in range(5)], columns=3)
    assert MIN_TILE == 128
    assert grid.mode == "RGB" and grid.width == 3 * 128
    assert grid.height % 2 == 0 and grid.height // 2 > 128  # two rows, each with a caption band
    expected = to_uint8(images).repeat(2, axis=1).repeat(2, axis=2)  # nearest neighbour x2
    for index in range(5):
        assert np.array_equal(tile_pixels(grid, index, columns=3, rows=2, tile=128), expected[index])


def test_large_images_keep_their_size_and_default_columns_are_about_square() -> None:
    images = torch.full((4, 3, 160, 160), 0.25)
    grid = make_grid(images, ["a cat | 1.23"] * 4)
    assert grid.width == 2 * 160
    assert np.all(tile_pixels(grid, 3, columns=2, rows=2, tile=160) == round(0.25 * 255))


def test_layout_does_not_depend_on_caption_length() -> None:
    images = torch.zeros(2, 3, 32, 32)
    short = make_grid(images, ["", "x"])
    long = make_grid(images, ["a very long prompt " * 20, "y"])
    assert short.size == long.size


def test_long_captions_wrap_to_the_width_and_end_in_an_ellipsis() -> None:
    font = ImageFont.load_default()
    lines = wrap_caption("a photo of an astronaut riding a horse on the moon " * 5 + "| 1.23", font, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith(ELLIPSIS)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert all(measure.textlength(line, font=font) <= 120 for line in lines)


def test_a_word_wider_than_the_tile_is_split() -> None:
    lines = wrap_caption("x" * 200, ImageFont.load_default(), 100, max_lines=10)
    assert "".join(lines) == "x" * 200 and len(lines) > 1


@pytest.mark.parametrize(
    ("shape", "captions", "message"),
    [((2, 1, 8, 8), ["a", "b"], r"\[B, 3, H, W\]"), ((2, 3, 8, 8), ["a"], "1 captions for 2 images")],
)
def test_bad_inputs_are_rejected(shape: tuple[int, ...], captions: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_grid(torch.zeros(shape), captions)
