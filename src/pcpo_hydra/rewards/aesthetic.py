"""LAION aesthetic predictor (v2, "improved"): an MLP on CLIP ViT-L/14's L2-normalised image embedding.

DDPO's aesthetic reward. The head is LAION's `sac+logos+ava1-l14-linearMSE.pth`: five linear
layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1) with dropout between the first four, which is a no-op
when scoring. Scores are on LAION's 1-10 rating scale.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from pcpo_hydra.models.loading import WeightsFor, load_error, read_state_dict, weight_file
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.rewards.clip_score import CLIP_LAYOUT, ClipEmbedder

HEAD_LAYOUT = "the LAION aesthetic MLP as a .pth or .safetensors file"
HEAD_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear layers in LAION's nn.Sequential (dropouts between)


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
    """The MLP with the published weights; its input width is read from the file."""
    state = read_state_dict(path, str(path), owner)
    expected = {f"layers.{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")}
    if set(state) != expected:
        raise load_error(str(path), None, None, f"not the aesthetic MLP: keys {sorted(state)[:4]}...", owner)
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
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
        self.clip = ClipEmbedder(pretrained, revision, device, dtype, WeightsFor(kind, "reward.pretrained", CLIP_LAYOUT))
        owner = WeightsFor(kind, "reward.head", HEAD_LAYOUT)
        self.head = load_head(weight_file(head, owner), owner).to(self.clip.model.device)
        width = self.clip.model.config.projection_dim
        if self.head.layers[0].in_features != width:
            raise load_error(head, None, None, f"the head takes {self.head.layers[0].in_features}-d embeddings, "
                             f"the CLIP model {pretrained!r} gives {width}-d", owner)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.clip.embed_images(images))
