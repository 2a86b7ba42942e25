"""Drawing the world: shape outlines as point tests, used by the renderer and by the shape reward.

Every shape is placed by its centroid and sized by its area (fractions of the image side and of
the image), so one function draws a caption's shape and also fits a template of any shape to
whatever a model drew.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pcpo_shapes_world.grammar import BACKGROUND, SHAPES
from pcpo_shapes_world.scenes import Scene

SUPERSAMPLE = 4  # sub-pixels per side averaged into one pixel: anti-aliased edges, as a camera would give


def pixel_grid(side: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(x [1, side], y [side, 1]): pixel-centre coordinates of a side x side grid, as fractions of the side.

    Kept as a row and a column, broadcasting to [side, side] only where they meet: a full grid per
    image per step costs more in memory traffic than the arithmetic.
    """
    centres = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    return centres[None, :], centres[:, None]


def shape_masks(shapes: Tensor, centres: Tensor, areas: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Bool [B, H, W]: which points (x [1, W], y [H, 1]) lie inside shape `shapes[b]` (an index into SHAPES).

    Circle, axis-aligned square, and an upright equilateral triangle (apex at the top), each with
    its centroid at `centres[b]` = (x, y) and covering `areas[b]` of the unit square.
    """
    dx = x - centres[:, 0, None, None]  # [B, 1, W]
    dy = y - centres[:, 1, None, None]  # [B, H, 1]
    area = areas[:, None, None]
    circle = dx**2 + dy**2 <= area / math.pi
    half_side = area.sqrt() / 2
    square = (dx.abs() <= half_side) & (dy.abs() <= half_side)
    height = (area * math.sqrt(3)).sqrt()  # of an equilateral triangle with this area
    # The centroid is a third of the height above the base; the sides widen by 1/sqrt(3) per unit down.
    triangle = (dy <= height / 3) & (dx.abs() * math.sqrt(3) <= dy + 2 * height / 3)
    shape = shapes[:, None, None]
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))  # order of SHAPES


def coverage(shapes: Tensor, centres: Tensor, areas: Tensor, side: int) -> Tensor:
    """Float [B, side, side] in [0, 1]: how much of each pixel shape `shapes[b]` covers (see shape_masks)."""
    x, y = pixel_grid(side * SUPERSAMPLE, centres.device)
    fine = shape_masks(shapes, centres, areas, x, y)[:, None].float()
    return torch.nn.functional.avg_pool2d(fine, SUPERSAMPLE).squeeze(1)


def render(scenes: Sequence[Scene], resolution: int = 32) -> Tensor:
    """Images [B, 3, resolution, resolution] in [0, 1]: each scene's shape on the background."""
    shapes = torch.tensor([SHAPES.index(s.attributes.shape) for s in scenes])
    centres = torch.tensor([s.centre for s in scenes], dtype=torch.float32)
    areas = torch.tensor([s.area for s in scenes], dtype=torch.float32)
    cover = coverage(shapes, centres, areas, resolution)[:, None]
    fill = torch.tensor([s.rgb for s in scenes], dtype=torch.float32)[:, :, None, None]
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None]
    return background + cover * (fill - background)
