"""Rewards with meaning in the shapes world (pcpo_shapes_world): does the image show what its caption says?

Every image is segmented the same way (`Foreground`): each pixel is read as a blend of the
background and the colour word that fits it best (`palette_blend`), and counts as foreground by
how much of it that colour covers (weight 0 below 10% cover, 1 above 90%, linear between). Each
reward compares one attribute of that weighted foreground with the caption, parsed by the world's
own grammar, and lies in [0, 1]:

- colour:   the share of the foreground labelled with the caption's colour.
- position: 1 - d / 0.25 (floored at 0), d the distance from the foreground's centroid to the
            caption's position, in image sides; 0.25 is the step between neighbouring positions.
- size:     1 - |ln(A / A*)| / ln(A_large / A_small) (floored at 0), A the foreground's share of the
            image and A* the caption's; a shape of the other size scores 0.
- shape:    how clearly the outline reads as the caption's shape: each shape is drawn at the
            foreground's centroid with its area, and the score is the softmax over shapes of
            IoU(foreground, drawn shape) / SHAPE_TEMPERATURE at the caption's shape (1/3: undecided).

An image with no foreground scores 0 on all four. The world's own renders score close to 1 on
each (they jitter position, area and colour a little); uniform noise scores low on every one but
position, where a centroid at the middle of the image counts as "in the centre".
`reward=world_all` is their mean, through the core's `pcpo_hydra.rewards.multi`, each part logged on its own.
A prompt outside the world's grammar is an error (use prompts=world).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from functools import lru_cache

import torch
from torch import Tensor

from pcpo_hydra.rewards.base import BaseReward
from pcpo_shapes_world.grammar import BACKGROUND, COLOURS, POSITION_OFFSET, POSITIONS, SHAPES, SIZES, Attributes, parse
from pcpo_shapes_world.render import coverage, pixel_grid

COLOUR_WORDS = tuple(COLOURS)
SHAPE_TEMPERATURE = 0.05  # the IoUs of one outline with the three templates differ by ~0.15-0.3
# A pixel's foreground weight rises linearly from 0 to 1 as its colour's cover goes from 0.1 to 0.9:
# anti-aliased edges count about by how much of them the shape covers, a faint haze over the
# background not at all, and a fill a little off its reference colour fully. (Measured on 512 renders:
# a hard 0.5 threshold let rasterisation cost the worst render 0.33 of size and 0.7 of shape reward.)
COVER_RAMP = (0.1, 0.9)


@lru_cache(maxsize=4096)
def _parsed(caption: str) -> Attributes:
    return parse(caption)


def palette_blend(images: Tensor) -> tuple[Tensor, Tensor]:
    """(label, cover), each [B, H, W]: the colour word whose blend with the background fits each pixel best
    (an index into COLOUR_WORDS), and how much of the pixel that colour covers, in [0, 1].

    A pixel is read as an anti-aliased edge is made: background + cover x (colour - background),
    with cover fitted by least squares in RGB. Nearest-colour labelling would read the dim edge
    of a yellow shape as green.
    """
    background = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device)
    colours = torch.tensor(list(COLOURS.values()), dtype=images.dtype, device=images.device) - background
    offset = images - background[:, None, None]                                  # [B, 3, H, W]
    projection = torch.einsum("bchw,kc->bkhw", offset, colours)
    cover = (projection / colours.pow(2).sum(1)[:, None, None]).clamp(0.0, 1.0)  # [B, K, H, W]
    residual = (offset[:, None] - cover[:, :, None] * colours[None, :, :, None, None]).pow(2).sum(2)
    label = residual.argmin(1, keepdim=True)
    return label.squeeze(1), cover.gather(1, label).squeeze(1)


def ramp(cover: Tensor) -> Tensor:
    """Foreground weight of a cover: 0 up to COVER_RAMP[0], 1 from COVER_RAMP[1], linear between."""
    low, high = COVER_RAMP
    return ((cover - low) / (high - low)).clamp(0.0, 1.0)


class Foreground:
    """The weighted foreground of a batch and the statistics every world reward reads."""

    def __init__(self, images: Tensor) -> None:
        self.labels, cover = palette_blend(images)
        self.weight = ramp(cover)                        # [B, H, W] in [0, 1]
        self.side = images.shape[-1]
        self.x, self.y = pixel_grid(self.side, images.device)
        self.total = self.weight.flatten(1).sum(1)       # foreground, in pixels
        self.area = self.total / self.weight[0].numel()  # foreground, as a fraction of the image
        self.empty = self.total == 0

    def mean(self, values: Tensor) -> Tensor:
        """[B]: the foreground-weighted mean of per-pixel `values` ([H, W] or [B, H, W])."""
        return (self.weight * values).flatten(1).sum(1) / self.total.clamp(min=1e-12)

    def centroid(self) -> Tensor:
        """[B, 2] (x, y) of the foreground's weighted mean pixel centre, in image sides."""
        return torch.stack([self.mean(self.x), self.mean(self.y)], dim=1)


class WorldReward(BaseReward):
    """Parses each prompt with the world grammar, segments each image once, scores one attribute."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        wanted = [_parsed(prompt) for prompt in prompts]
        found = Foreground(images)
        scores = self.agreement(found, wanted).clamp(0.0, 1.0)
        return torch.where(found.empty, torch.zeros_like(scores), scores)

    @abstractmethod
    def agreement(self, found: Foreground, wanted: list[Attributes]) -> Tensor:
        """[B] agreement of each image's foreground with its caption's attribute (clamped to [0, 1] after)."""


class ColourAgreement(WorldReward):
    """The fraction of the foreground drawn in the caption's colour."""

    name = "world_colour"

    def agreement(self, found: Foreground, wanted: list[Attributes]) -> Tensor:
        labels = torch.tensor([COLOUR_WORDS.index(w.colour) for w in wanted], device=found.labels.device)
        return found.mean((found.labels == labels[:, None, None]).float())


class PositionAgreement(WorldReward):
    """1 at the caption's position, falling linearly to 0 one position step (0.25 of the side) away."""

    name = "world_position"

    def agreement(self, found: Foreground, wanted: list[Attributes]) -> Tensor:
        target = torch.tensor([POSITIONS[w.position] for w in wanted], device=found.weight.device)
        distance = (found.centroid() - target).norm(dim=1)
        return 1 - distance / POSITION_OFFSET


class SizeAgreement(WorldReward):
    """1 at the caption's area, 0 at a ratio of the large to the small area (or more) off it."""

    name = "world_size"

    def agreement(self, found: Foreground, wanted: list[Attributes]) -> Tensor:
        target = torch.tensor([SIZES[w.size] for w in wanted], device=found.weight.device)
        log_ratio = (found.area.clamp(min=1e-6) / target).log().abs()
        return 1 - log_ratio / math.log(SIZES["large"] / SIZES["small"])


class ShapeAgreement(WorldReward):
    """Softmax over the world's shapes of the foreground's IoU with each one's fitted template."""

    name = "world_shape"

    def agreement(self, found: Foreground, wanted: list[Attributes]) -> Tensor:
        ious = shape_ious(found)
        shapes = torch.tensor([SHAPES.index(w.shape) for w in wanted], device=ious.device)
        return (ious / SHAPE_TEMPERATURE).softmax(1).gather(1, shapes[:, None]).squeeze(1)


def shape_ious(found: Foreground) -> Tensor:
    """[B, len(SHAPES)]: soft IoU, sum(min) / sum(max), of each foreground's weights with those of every
    shape drawn (anti-aliased, like the world's renders) at the foreground's centroid with its area."""
    centres, batch = found.centroid(), found.weight.shape[0]
    ious = []
    for index in range(len(SHAPES)):
        shapes = torch.full((batch,), index, dtype=torch.long, device=found.weight.device)
        template = ramp(coverage(shapes, centres, found.area, found.side))
        overlap = torch.minimum(template, found.weight).flatten(1).sum(1)
        union = torch.maximum(template, found.weight).flatten(1).sum(1)
        ious.append(overlap / union.clamp(min=1e-12))
    return torch.stack(ious, dim=1)


def caption_agreements() -> tuple[WorldReward, ...]:
    """The four parts `reward=world_all` averages, for scripts that score world images outside a run."""
    return ColourAgreement(), PositionAgreement(), SizeAgreement(), ShapeAgreement()
