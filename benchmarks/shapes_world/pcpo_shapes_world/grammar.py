"""The world's vocabulary and its one caption grammar: "a <size> <colour> <shape> <position>".

Renderer, prompt source and rewards all read the same tables, so a caption means one thing
everywhere: which palette colour to draw, which outline, how much of the image to cover and where
the shape's centroid sits. Pure Python: importing it pulls in neither torch nor numpy.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pcpo_hydra.prompts import PromptSet

# Reference RGB of each colour word, in [0, 1]; renders jitter around it, rewards classify by it.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Fraction of the image a shape of each size covers (shapes of one size have equal areas).
SIZES: dict[str, float] = {"small": 0.03, "large": 0.09}
# Where the shape's centroid sits, as (x, y) fractions of the image side (y grows downwards).
POSITION_OFFSET = 0.25
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.5 - POSITION_OFFSET, 0.5),
    "right": (0.5 + POSITION_OFFSET, 0.5),
    "top": (0.5, 0.5 - POSITION_OFFSET),
    "bottom": (0.5, 0.5 + POSITION_OFFSET),
    "centre": (0.5, 0.5),
}
PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "centre": "in the centre",
}


@dataclass(frozen=True)
class Attributes:
    """What a caption asks for: one word of each vocabulary table."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, table, name in (
            (self.colour, COLOURS, "colour"), (self.shape, SHAPES, "shape"),
            (self.size, SIZES, "size"), (self.position, POSITIONS, "position"),
        ):
            if value not in table:
                raise ValueError(f"unknown {name} {value!r}: the world knows {', '.join(table)}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PHRASES[self.position]}"


def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_CAPTION = re.compile(
    rf"a (?P<size>{_alternatives(list(SIZES))}) (?P<colour>{_alternatives(list(COLOURS))}) "
    rf"(?P<shape>{_alternatives(SHAPES)}) (?P<phrase>{_alternatives(list(PHRASES.values()))})"
)
_POSITION_OF_PHRASE = {phrase: position for position, phrase in PHRASES.items()}


def parse(caption: str) -> Attributes:
    """The attributes a world caption asks for; ValueError for text outside the grammar.

    Case and surrounding or repeated whitespace are ignored, nothing else is.
    """
    match = _CAPTION.fullmatch(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(
            f"{caption!r} is not a world caption: expected 'a <size> <colour> <shape> <position>', e.g. "
            f"'a large red circle on the left' (use prompts=world with the world rewards)"
        )
    groups = match.groupdict()
    return Attributes(groups["colour"], groups["shape"], groups["size"], _POSITION_OF_PHRASE[groups["phrase"]])


def all_attributes(
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    sizes: Sequence[str] = tuple(SIZES),
    positions: Sequence[str] = tuple(POSITIONS),
) -> list[Attributes]:
    """Every combination of the given words, in a fixed order (size, colour, shape, position)."""
    return [
        Attributes(colour, shape, size, position)
        for size, colour, shape, position in itertools.product(sizes, colours, shapes, positions)
    ]


def world_prompts(
    colours: Sequence[str], shapes: Sequence[str], sizes: Sequence[str], positions: Sequence[str]
) -> PromptSet:
    """Hydra target of conf/prompts/world.yaml: the captions of every combination of the given words."""
    for name, words in (("colours", colours), ("shapes", shapes), ("sizes", sizes), ("positions", positions)):
        if not words:
            raise ValueError(f"prompts.{name} is empty: give at least one word")
    captions = tuple(a.caption for a in all_attributes(colours, shapes, sizes, positions))
    return PromptSet("world", captions)
