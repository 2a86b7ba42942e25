"""What `reward=remote` and `pcpo-reward-server` send each other over HTTP.

A request is an uncompressed NPZ holding `images`, 8-bit RGB pixels [B, H, W, 3] made by
`images.to_uint8` (round(x * 255)), and `prompts`, a JSON list of strings. 8 bits lose nothing
a reward here sees: every one (JPEG, CLIP-based) turns its float input into exactly these pixels
first, and the server's float image k / 255 maps back to pixel k. They are also 4x smaller than
float32. A reward that reads floats directly would see the images quantised to 8 bits.
A reply is JSON {"scores": [...]}: float32 scores survive the trip exactly (NaN included); an
error reply is its message as plain text.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

REQUEST_TYPE = "application/x-npz"
ERROR_TYPE = "text/plain; charset=utf-8"


def encode_request(pixels: np.ndarray, prompts: list[str]) -> bytes:
    """NPZ bytes of uint8 pixels [B, H, W, 3] and their B prompts."""
    buffer = io.BytesIO()
    np.savez(buffer, images=pixels, prompts=np.array(json.dumps(prompts)))
    return buffer.getvalue()


def decode_request(body: bytes) -> tuple[np.ndarray, list[str]]:
    """The pixels and prompts of a request; ValueError (the client's fault) if it is malformed."""
    if not body.startswith(b"PK"):  # what every zip, hence every NPZ, starts with
        raise ValueError(f"request body is not an NPZ archive ({len(body)} bytes); see pcpo_hydra.rewards.wire")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            pixels, prompts = archive["images"], json.loads(str(archive["prompts"][()]))
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"request is not an NPZ with 'images' and 'prompts' ({error})") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or not len(pixels):
        raise ValueError(f"images must be uint8 [B, H, W, 3] with B >= 1, got {pixels.dtype} {pixels.shape}")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a JSON list of strings")
    if len(prompts) != len(pixels):
        raise ValueError(f"{len(prompts)} prompts for {len(pixels)} images")
    return pixels, prompts


def encode_scores(scores: list[float]) -> bytes:
    return json.dumps({"scores": scores}).encode()


def decode_scores(body: bytes, expected: int) -> list[float]:
    """The scores of a reply, checked to be one per image sent."""
    scores = json.loads(body)["scores"]
    if len(scores) != expected:
        raise ValueError(f"reward server returned {len(scores)} scores for {expected} images")
    return scores
