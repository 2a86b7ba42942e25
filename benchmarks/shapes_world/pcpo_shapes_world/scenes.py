"""Scenes: a caption's attributes plus the small nuisance a real photo would have, drawn from a seed.

Each scene jitters the shape's centroid, its area and its colour a little around what the caption
asks for, so one caption has many renders: a model trained on them learns a distribution, not a
lookup table, and a group of samples for one prompt has diversity to measure. Every jitter stays
well inside what the rewards count as agreeing with the caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pcpo_shapes_world.grammar import COLOURS, POSITIONS, SIZES, Attributes, all_attributes

CENTRE_JITTER = 0.03   # +- fraction of the image side, on each axis
AREA_JITTER = 0.10     # area x U(1 - j, 1 + j)
COLOUR_JITTER = 0.06   # +- per RGB channel


@dataclass(frozen=True)
class Scene:
    """One image of the world: what its caption says, and exactly how it is drawn."""

    attributes: Attributes
    centre: tuple[float, float]          # centroid (x, y) as fractions of the image side
    area: float                          # fraction of the image the shape covers
    rgb: tuple[float, float, float]      # fill colour in [0, 1]

    @property
    def caption(self) -> str:
        return self.attributes.caption


def exact_scene(attributes: Attributes) -> Scene:
    """The scene a caption describes with no jitter: its reference centroid, area and colour."""
    return Scene(attributes, POSITIONS[attributes.position], SIZES[attributes.size], COLOURS[attributes.colour])


def jittered(attributes: Attributes, rng: np.random.Generator) -> Scene:
    """A scene of `attributes` with centroid, area and colour drawn around their reference values."""
    exact = exact_scene(attributes)
    centre = np.asarray(exact.centre) + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
    area = exact.area * rng.uniform(1 - AREA_JITTER, 1 + AREA_JITTER)
    rgb = np.clip(np.asarray(exact.rgb) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3), 0.0, 1.0)
    return Scene(attributes, tuple(centre.tolist()), float(area), tuple(rgb.tolist()))


def sample_scenes(count: int, seed: int, attributes: Sequence[Attributes] | None = None) -> list[Scene]:
    """`count` scenes, each of attributes drawn uniformly from `attributes` (default: the whole world).

    The same (count, seed, attributes) always give the same scenes.
    """
    choices = list(attributes) if attributes is not None else all_attributes()
    if not choices:
        raise ValueError("no attributes to draw scenes from")
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(choices), size=count)
    return [jittered(choices[k], rng) for k in picks]
