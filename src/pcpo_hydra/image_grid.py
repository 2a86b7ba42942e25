"""Captioned sample grids, for the tracker and the benchmarks.

Tiny built-in models make 32-64 px images; tiles are enlarged by a whole factor (nearest
neighbour, so every model pixel stays an exact block) until they are large enough to judge.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from pcpo_hydra.images import check_images, to_pil

MIN_TILE = 128          # px: a tile's long side is enlarged by a whole factor to at least this
CAPTION_LINES = 3       # lines under each tile; the last line of a longer caption ends in ELLIPSIS
ELLIPSIS = "..."        # ASCII: every font PIL may fall back to has these glyphs
MARGIN = 3              # px between a tile's edge and its caption text
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def wrap_caption(text: str, font: Font, width: int, max_lines: int = CAPTION_LINES) -> list[str]:
    """Greedy word wrap to `width` px; over-long words are split, and overflow ends in ELLIPSIS."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(line: str) -> bool:
        return measure.textlength(line, font=font) <= width

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".lstrip()
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while not fits(current):
            cut = max(1, max(n for n in range(len(current) + 1) if fits(current[:n])))
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and not fits(last + ELLIPSIS):
        last = last[:-1]
    return lines[: max_lines - 1] + [last.rstrip() + ELLIPSIS]


def make_grid(images: Tensor, captions: list[str], columns: int | None = None) -> Image.Image:
    """Tiles in rows of `columns` (default: about square), each with its caption underneath.

    Tile i sits at x = (i % columns) * tile_width, y = (i // columns) * (tile_height + caption
    height); the caption band has room for CAPTION_LINES lines whatever the captions say, so the
    layout depends only on the batch shape.
    """
    check_images(images)
    count, _, height, width = images.shape
    if len(captions) != count:
        raise ValueError(f"{len(captions)} captions for {count} images")
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    rows = math.ceil(count / columns)
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    tile_w, tile_h = width * scale, height * scale
    font = ImageFont.load_default(size=max(10, tile_w // 25))
    line_h = font.getbbox("Ag|")[3] + 2
    cell_h = tile_h + CAPTION_LINES * line_h + 2 * MARGIN
    grid = Image.new("RGB", (columns * tile_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for index, (tile, caption) in enumerate(zip(to_pil(images), captions)):
        x, y = (index % columns) * tile_w, (index // columns) * cell_h
        grid.paste(tile.resize((tile_w, tile_h), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(wrap_caption(caption, font, tile_w - 2 * MARGIN)):
            draw.text((x + MARGIN, y + tile_h + MARGIN + k * line_h), line, font=font, fill=INK)
    return grid
