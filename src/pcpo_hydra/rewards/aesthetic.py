"""LAION aesthetic predictor (v2, "improved"): an MLP on CLIP ViT-L/14's L2-normalised image embedding.

DDPO's aesthetic reward. The head is LAION's `sac+logos+ava1-l14-linearMSE.pth`: five linear
layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1) with dropout between the first four, which is a no-op
when scoring. Scores are on LAION's 1-10 rating scale.

LAION's script embeds images with OpenAI CLIP's `clip.load` model and transform: torchvision's
Resize(224, bicubic) on the PIL image, CenterCrop(224), ToTensor, OpenAI's normalisation. That
crop rounds its offset where transformers' processor floors it (a one-pixel shift when the resized
longer side exceeds 224 by 3, 7, 11, ...), so this reward runs that transform (ClipTransform.openai_clip).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.clip_score import CLIP_LAYOUT, ClipEmbedder
from pcpo_hydra.weights import WeightsFor, load_error, read_state_dict, weight_file

HEAD_LAYOUT = "the LAION aesthetic MLP as a .pth or .safetensors file"
HEAD_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear layers in LAION's nn.Sequential (dropouts between)
HEAD_KEYS_SHOWN = 4  # keys quoted in a mismatch error


class AestheticHead(nn.Module):
    """LAION's MLP with its own layer indices, so its state dict loads as published."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


LAION_HEAD = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)


def load_head(path: Path, owner: WeightsFor) -> AestheticHead:
    """The MLP with the published weights; its input width is read from the file.

    Every key must be there and no other, in the published shapes: a partial file would otherwise
    leave layers at their random initialisation and score without a word.
    """
    state = read_state_dict(path, str(path), owner)
    expected = {f"layers.{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        listed = [f"{what} keys {keys[:HEAD_KEYS_SHOWN]}{'...' if len(keys) > HEAD_KEYS_SHOWN else ''}"
                  for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise load_error(str(path), None, None, f"not the aesthetic MLP: {'; '.join(listed)}", owner)
    head = AestheticHead(state["layers.0.weight"].shape[1])
    shapes = head.state_dict()
    if wrong := [f"{key} {tuple(state[key].shape)} (MLP: {tuple(value.shape)})"
                 for key, value in shapes.items() if state[key].shape != value.shape]:
        reason = f"not the aesthetic MLP: shapes differ: {', '.join(wrong[:HEAD_KEYS_SHOWN])}"
        raise load_error(str(path), None, None, reason, owner)
    head.load_state_dict(state, strict=True)
    return head.eval().requires_grad_(False)


class AestheticScore(BaseReward):
    """LAION aesthetic rating of each image (prompts are not used)."""

    name = "aesthetic"

    def __init__(
        self,
        pretrained: str = "openai/clip-vit-large-patch14",
        head: str = LAION_HEAD,
        revision: str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        super().__init__(batch_size)
        kind = f"reward {self.name!r}"
        clip_owner = WeightsFor(kind, "reward.pretrained", CLIP_LAYOUT)
        self.clip = ClipEmbedder(pretrained, revision, device, dtype, clip_owner, preprocessing="openai_clip")
        owner = WeightsFor(kind, "reward.head", HEAD_LAYOUT)
        self.head = load_head(weight_file(head, owner), owner).to(self.clip.model.device)
        width = self.clip.model.config.projection_dim
        if self.head.layers[0].in_features != width:
            raise load_error(head, None, None, f"the head takes {self.head.layers[0].in_features}-d embeddings, "
                             f"the CLIP model {pretrained!r} gives {width}-d", owner)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.clip.embed_images(images))
