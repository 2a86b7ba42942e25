"""LAION's aesthetic predictor as its simple_inference.py runs it, on a tiny random OpenAI CLIP.

usage: aesthetic_laion.py WORKDIR IMAGES_NPZ OUT_NPZ

Builds OpenAI CLIP's own model class (clip.model.CLIP, as the clip-anytorch package ships it) with
tiny dimensions and random weights and saves its float16 state dict to WORKDIR/clip.pt; builds LAION's MLP
head, saves it as LAION published theirs (torch.save of the state dict) to WORKDIR/head.pth. Then
scores the images the way LAION's script does: `clip.load` of that file (its own model builder and
preprocess), encode_image, LAION's numpy L2 normalisation, the MLP.
"""

from __future__ import annotations

import clip_common  # first: makes torchvision importable under CPU torch

from pathlib import Path

import clip
import numpy as np
import torch
from clip.model import CLIP, convert_weights
from PIL import Image
from torch import nn

# Tiny dimensions OpenAI's builder can read back from a state dict: widths are multiples of 64
# (it derives the head count as width // 64), the input is 24 px in 8 px patches.
TINY = dict(embed_dim=16, image_resolution=24, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=128, transformer_width=64, transformer_heads=1, transformer_layers=1)


class MLP(nn.Module):
    """LAION's head as simple_inference.py defines it (there a LightningModule; only its layers score)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def normalized(a: np.ndarray, axis: int = -1, order: int = 2) -> np.ndarray:
    """LAION's L2 normalisation of the CLIP embedding, in numpy, zero vectors left as they are."""
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def build(workdir: Path) -> None:
    """Random tiny CLIP and head; the CLIP's parameters (LayerNorms too) jittered so none keeps its default."""
    torch.manual_seed(0)
    model = CLIP(**TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    convert_weights(model)  # float16, as OpenAI released its checkpoints (clip.load rounds to it in any case)
    torch.save(model.state_dict(), workdir / "clip.pt")
    head = MLP(TINY["embed_dim"])
    with torch.no_grad():  # default init makes a near-constant head; this spreads scores over about +-1
        for parameter in head.parameters():
            parameter.mul_(3.0)
    torch.save(head.state_dict(), workdir / "head.pth")


def main() -> None:
    workdir, images_path, out = clip_common.argv(3)
    workdir = Path(workdir)
    build(workdir)
    head = MLP(TINY["embed_dim"])
    head.load_state_dict(torch.load(workdir / "head.pth"))
    head.eval()
    model, preprocess = clip.load(str(workdir / "clip.pt"), device="cpu", jit=False)
    scores = []
    for batch in clip_common.read_images(images_path):
        image = torch.stack([preprocess(Image.fromarray(pixels)) for pixels in batch])
        with torch.no_grad():
            features = model.encode_image(image)
            embedding = normalized(features.cpu().detach().numpy())
            scores.append(head(torch.from_numpy(embedding).type(torch.FloatTensor)).squeeze(-1).numpy())
    clip_common.write_scores(out, scores)


if __name__ == "__main__":
    main()
