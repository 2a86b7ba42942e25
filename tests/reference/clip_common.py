"""What the CLIP-family reference scripts share: torchvision importable beside CPU torch, and the file formats.

Imported first by each script, which runs in the `clip` reference venv (tests/reference/clip.txt).
Inputs: an .npz of uint8 image batches [B, H, W, 3] (arr_0, arr_1, ...: one per image size) and a
JSON list of prompt lists, one per batch. Output: an .npz of float64 scores under the same names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torchvision_without_ops  # noqa: F401  (before anything imports torchvision)

import numpy as np


def read_images(path: str) -> list[np.ndarray]:
    """The uint8 batches, in order."""
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def read_prompts(path: str) -> list[list[str]]:
    """One list of prompts per image batch."""
    return json.loads(Path(path).read_text())


def write_scores(path: str, scores: list, **extra: np.ndarray) -> None:
    """Scores per batch as arr_0, arr_1, ... (float64), plus any named arrays a test also checks."""
    named = {f"arr_{i}": np.asarray(batch, dtype=np.float64) for i, batch in enumerate(scores)}
    np.savez(path, **named, **extra)


def argv(count: int) -> list[str]:
    """The script's arguments, or a usage error naming how many it takes."""
    if len(sys.argv) != count + 1:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} takes {count} arguments, got {sys.argv[1:]}")
    return sys.argv[1:]
