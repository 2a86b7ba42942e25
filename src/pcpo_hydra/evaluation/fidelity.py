"""Image-set metrics for `pcpo-eval`: FID, FD-DINOv2, Inception Score and LPIPS diversity.

`pcpo-eval` compares folders of generated images (the base model and fine-tuned policies, same prompts
and seeds). Images are float tensors [N, 3, H, W] in [0, 1], of any size. Every metric is the
library's; this module picks the weights, batches the images and caches features.

- **FID** (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to two sets' features,
  ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). Features: the 2048-d pool of torch-fidelity's
  InceptionV3 (the TF-FID port) as torchmetrics' `FrechetInceptionDistance` runs it (images cast to
  8 bit, resized to 299 bilinearly with antialiasing, torchmetrics' default). Weights:
  torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`.
- **FD-DINOv2** (Stein et al. 2023, the PCPO paper's main fidelity metric): the same distance on the
  CLS token of DINOv2's last hidden state (768-d for ViT-B/14), the images preprocessed as DINOv2's
  image processor does (see `dinov2_pixels`). Weights: transformers' `Dinov2Model`, by default
  `facebook/dinov2-base`, or a local save_pretrained folder (`weights.dinov2`).
- **Inception Score** (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over the InceptionV3's
  1008 logits, mean and std over splits, by torchmetrics' `InceptionScore`. Same weight file as FID.
- **LPIPS diversity** of a group (one prompt's images): the mean LPIPS (Zhang et al. 2018) over all
  unordered pairs i < j, by torchmetrics' `LearnedPerceptualImagePatchSimilarity` with the AlexNet
  backbone (torchvision's `alexnet-owt-7be5be79.pth`; the linear heads ship inside torchmetrics).

Fréchet distances are computed from per-image features (`FidelityMetrics.features`, then
`frechet_distance`) because one reference set is compared with several policies, per prompt too:
every image goes through a network once. With fewer than 2 images in a set a distance is undefined
(NaN); so is the diversity of a single image.

Weights: the two torch.hub files are looked up in `<weights.torch_hub>/checkpoints/` (null: torch's
own hub dir); `weight_problems` names any that is missing while its download host is unreachable,
before any network is built.

This module imports torch at the top, so the CLI imports it where it evaluates, not where it parses
arguments; torchmetrics and transformers are imported inside the functions that build networks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pcpo_hydra.evaluation.config import METRICS
from pcpo_hydra.weights import ModelLoadError, WeightsFor, check_source, host_unreachable, load_component

if TYPE_CHECKING:
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from transformers import Dinov2Model

FRECHET = ("fid", "fd_dinov2")

# Where torch-fidelity and torchvision download the two torch.hub files from (tests check they are
# the libraries' own URLs): kept here so that `weight_problems` needs neither library imported.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
HUB_FILES = {INCEPTION_URL: ("fid", "inception_score"), ALEXNET_URL: ("lpips_diversity",)}

DINOV2 = WeightsFor(
    "metric fd_dinov2", "weights.dinov2",
    "a folder saved with save_pretrained holding a Dinov2Model's config.json and model.safetensors, "
    "e.g. from `hf download facebook/dinov2-base`",
)

# torchmetrics' name for torch-fidelity's InceptionV3, and the two outputs used: the pool (FID) and
# the logits without bias (what torchmetrics' InceptionScore scores by default).
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FEATURES = ("2048", "logits_unbiased")
IS_SPLITS = 10  # the customary number of splits (torchmetrics' default), for sets of 20 images or more
DINOV2_RESIZE = 256  # facebook/dinov2-*'s preprocessor_config.json: shortest edge 256, bicubic,
DINOV2_CROP = 224  # then a 224 centre crop and ImageNet normalisation
LPIPS_NET = "alex"


def checked_metrics(metrics: Iterable[str]) -> set[str]:
    """The metric names as a set; an unknown name is an error listing the known ones."""
    wanted = set(metrics)
    unknown = sorted(wanted - set(METRICS))
    if unknown:
        raise ValueError(f"unknown fidelity metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return wanted


def hub_checkpoints(torch_hub: str | None) -> Path:
    """The folder torch.hub keeps downloaded weights in: `<torch_hub>/checkpoints`, or torch's own."""
    return Path(torch_hub or torch.hub.get_dir()).expanduser() / "checkpoints"


def _file_name(url: str) -> str:
    """The file name torch.hub saves a download under: the URL's last part."""
    return url.rsplit("/", 1)[1]


def weight_problems(metrics: Iterable[str], torch_hub: str | None, dinov2: str) -> list[str]:
    """One line per weight that the metrics need and cannot get: absent here while its download host
    is unreachable (a short TCP probe). Runs before any network is built, so an offline machine
    fails in seconds with the file and the config key to set, not deep inside a library's download."""
    wanted = checked_metrics(metrics)
    problems = []
    folder = hub_checkpoints(torch_hub)
    for url, users in HUB_FILES.items():
        needing = [name for name in users if name in wanted]
        file = _file_name(url)
        if not needing or (folder / file).is_file():
            continue
        reason = host_unreachable(url)
        if reason:
            label = "metric" if len(needing) == 1 else "metrics"
            problems.append(f"{label} {', '.join(needing)}: {file} is not in {folder} and {reason}; "
                            f"set weights.torch_hub=<folder holding checkpoints/{file}>")
    if "fd_dinov2" in wanted:
        try:
            check_source(dinov2, owner=DINOV2)
        except ModelLoadError as error:
            problems.append(str(error))
    return problems


@contextmanager
def _hub_dir(torch_hub: str | None) -> Iterator[None]:
    """torch.hub's folder set to `torch_hub` while the libraries build their networks, then restored.

    torchvision's AlexNet (LPIPS' backbone) takes no weights path: torchmetrics builds it with
    `alexnet(weights=DEFAULT)`, which loads `<hub dir>/checkpoints/alexnet-owt-7be5be79.pth`
    (downloading it there if absent, with its hash check). Pointing the hub dir at `torch_hub` for the
    construction keeps that loading the library's own, instead of re-filling its layers by hand.
    Restoring pins the hub dir to the path it resolved to before, which is what it returns anyway.
    """
    if torch_hub is None:
        yield
        return
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(Path(torch_hub).expanduser()))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def inception_network(weights: str | None) -> NoTrainInceptionV3:
    """torchmetrics' InceptionV3 (never leaves eval mode) with both outputs the metrics use.

    `weights`: the checkpoint file; None downloads it into torch.hub's folder.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name=INCEPTION_NAME, features_list=list(INCEPTION_FEATURES),
                              feature_extractor_weights_path=weights)


def lpips_network() -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics' LPIPS on AlexNet for [0, 1] images, averaging over the pairs it is given."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NET, reduction="mean", normalize=True)


def dinov2_pixels(images: Tensor) -> Tensor:
    """[0, 1] images as DINOv2's image processor (transformers' BitImageProcessor with dinov2's
    config) feeds them to the model: shorter side to 256 (bicubic), 224 centre crop, ImageNet mean/std.

    Done on tensors on the images' device, batched, instead of through the processor's per-image
    loop: torch's bicubic with antialiasing is what the processor's torchvision backend runs (PIL's
    bicubic, of its PIL backend, differs slightly). Values are clamped to [0, 1] after the resize,
    as the processor's 8-bit path does, since the images come from 8-bit files.
    """
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    height, width = images.shape[-2:]
    # transformers' get_resize_output_image_size: the shorter side to 256, the longer scaled and truncated.
    short, long = min(height, width), max(height, width)
    scaled = int(DINOV2_RESIZE * long / short)
    size = (DINOV2_RESIZE, scaled) if height <= width else (scaled, DINOV2_RESIZE)
    resized = nn.functional.interpolate(images.float(), size=size, mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0, 1)
    top, left = (size[0] - DINOV2_CROP) // 2, (size[1] - DINOV2_CROP) // 2
    cropped = resized[..., top:top + DINOV2_CROP, left:left + DINOV2_CROP]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (cropped - mean) / std


class DinoV2Features(nn.Module):
    """[0, 1] images -> DINOv2's CLS token (last_hidden_state[:, 0]); usable as torchmetrics FID's `feature`."""

    def __init__(self, model: Dinov2Model) -> None:
        super().__init__()
        self.model = model.eval()
        self.num_features = model.config.hidden_size  # read by FrechetInceptionDistance instead of a dummy pass

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=dinov2_pixels(images)).last_hidden_state[:, 0]


def load_dinov2(source: str) -> DinoV2Features:
    """DINOv2 from a hub id or a local folder, loaded strictly (every weight from the files)."""
    from transformers import Dinov2Model

    return DinoV2Features(load_component(Dinov2Model, source, "", owner=DINOV2))


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (float64,
    unbiased covariances, torchmetrics' `_compute_fid`); NaN when either set has fewer than 2 rows.

    With N + M <= D (a prompt's few images) both sets are first moved into the affine span of their
    union, in an orthonormal basis of at most N + M - 1 dimensions: a rotation and translation of
    both sets, which leaves the distance unchanged (both Gaussians live in that span), and turns
    the D x D eigenproblem (seconds for D = 2048 on a CPU) into a small one.
    """
    from torchmetrics.image.fid import _compute_fid

    if len(a) < 2 or len(b) < 2:
        return math.nan
    a, b = a.double(), b.double()
    if len(a) + len(b) <= a.shape[1]:
        union = torch.cat([a, b])
        center = union.mean(0)
        basis, _ = torch.linalg.qr((union - center).T)  # D x (N + M), orthonormal columns
        a, b = (a - center) @ basis, (b - center) @ basis
    return float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))


def inception_splits(count: int) -> int:
    """IS_SPLITS, or fewer for a small set so that each split holds at least two images.

    A split of one image scores exactly 1 (its marginal is its own prediction), which says nothing
    about diversity. Under 4 images there is one split, and the std over splits is NaN.
    """
    return max(1, min(IS_SPLITS, count // 2))


def inception_score_from_logits(logits: Tensor, splits: int | None = None, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of torchmetrics' InceptionScore over `splits` (default `inception_splits`) of
    the images whose InceptionV3 logits are given.

    The library shuffles the images before splitting; `seed` fixes that shuffle (the global RNG is
    left as it was), so the same images always score the same.
    """
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        # Its warning that it keeps every feature in memory (a set's logits are what it is given), and
        # torch's for the std of a single split, which is NaN as documented.
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom", category=UserWarning)
        metric = InceptionScore(feature=nn.Identity(), splits=splits or inception_splits(len(logits)))
        metric.update(logits)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
    return float(mean), float(std)


class FidelityMetrics:
    """The networks the chosen metrics need, each built once, and the metrics computed with them.

    Construct with networks (tests inject randomly initialised ones) or with `build` (the weights).
    A network left out makes its metrics unavailable: `features` omits them, the others raise.
    """

    def __init__(
        self, inception: NoTrainInceptionV3 | None = None, dinov2: DinoV2Features | None = None,
        lpips: LearnedPerceptualImagePatchSimilarity | None = None, device: str = "cpu", batch_size: int = 64,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.inception = inception.to(self.device) if inception is not None else None
        self.dinov2 = dinov2.to(self.device) if dinov2 is not None else None
        self.lpips = lpips.to(self.device) if lpips is not None else None

    @classmethod
    def build(
        cls, metrics: Sequence[str], torch_hub: str | None, dinov2: str, device: str = "cpu", batch_size: int = 64,
    ) -> FidelityMetrics:
        """The networks of `metrics` from their weights: the torch.hub files under `torch_hub`
        (null: torch's hub dir; downloaded there when absent), DINOv2 from `dinov2` (hub id or folder)."""
        wanted = checked_metrics(metrics)
        inception = lpips = None
        with _hub_dir(torch_hub):
            if wanted & {"fid", "inception_score"}:
                # The explicit path where torch-fidelity accepts one; None lets it download into the hub dir.
                weights = hub_checkpoints(torch_hub) / _file_name(INCEPTION_URL)
                inception = inception_network(str(weights) if weights.is_file() else None)
            if "lpips_diversity" in wanted:
                lpips = lpips_network()
        dino = load_dinov2(dinov2) if "fd_dinov2" in wanted else None
        return cls(inception, dino, lpips, device, batch_size)

    def _batches(self, images: Tensor) -> Iterator[Tensor]:
        for start in range(0, len(images), self.batch_size):
            yield images[start:start + self.batch_size].to(self.device)

    @staticmethod
    def _unit(images: Tensor) -> Tensor:
        """Images as floats in [0, 1]: 8-bit ones (what a sample folder holds) are divided by 255."""
        return images.float() / 255 if images.dtype == torch.uint8 else images

    @torch.inference_mode()
    def features(self, images: Tensor, names: Iterable[str] = METRICS) -> dict[str, Tensor]:
        """Per-image features [N, D] on the CPU of each of `names` with a network here: "fid"
        (Inception pool), "inception_score" (Inception logits), "fd_dinov2" (DINOv2 CLS); one pass per network.

        `images` are floats in [0, 1] or 8 bits; 8-bit images go to Inception as they are (a float
        round trip, k / 255 * 255 truncated, could lose one level), and keep a large set at a
        quarter of a float copy's memory.
        """
        names = set(names)
        inception = self.inception if names & {"fid", "inception_score"} else None
        dinov2 = self.dinov2 if "fd_dinov2" in names else None
        found: dict[str, list[Tensor]] = {}
        for batch in self._batches(images):
            if inception is not None:
                # torchmetrics' forward returns only the first feature; its torch-fidelity pass returns
                # both, so FID and IS share one pass. The 8-bit cast is FrechetInceptionDistance's own
                # for normalize=True inputs (truncating, as the library does).
                pixels = batch if batch.dtype == torch.uint8 else (batch * 255).byte()
                pool, logits = inception._torch_fidelity_forward(pixels)
                found.setdefault("fid", []).append(pool.cpu())
                found.setdefault("inception_score", []).append(logits.cpu())
            if dinov2 is not None:
                found.setdefault("fd_dinov2", []).append(dinov2(self._unit(batch)).cpu())
        return {name: torch.cat(parts) for name, parts in found.items() if name in names}

    def _require(self, name: str) -> None:
        networks = {"fid": self.inception, "inception_score": self.inception, "fd_dinov2": self.dinov2,
                    "lpips_diversity": self.lpips}
        if networks[name] is None:
            raise KeyError(f"{name} is not available here: its network was not built")

    def _feature(self, name: str, images: Tensor) -> Tensor:
        self._require(name)
        return self.features(images, (name,))[name]

    def frechet(self, name: str, reference: Tensor, images: Tensor) -> float:
        """FID or FD-DINOv2 (`name` in FRECHET) of `images` against `reference`. To compare one
        reference with several sets, call `features` once per set and `frechet_distance` instead."""
        if name not in FRECHET:
            raise ValueError(f"{name} is not a Fréchet distance; one of {', '.join(FRECHET)}")
        if min(len(reference), len(images)) < 2:
            return math.nan  # undefined; no network pass needed to say so
        return frechet_distance(self._feature(name, reference), self._feature(name, images))

    def inception_score(self, images: Tensor) -> tuple[float, float]:
        """(mean, std) Inception Score of the images over `inception_splits(len(images))` splits."""
        return inception_score_from_logits(self._feature("inception_score", images))

    @torch.inference_mode()
    def lpips_diversity(self, images: Tensor) -> float:
        """Mean LPIPS over all unordered pairs of the images (one prompt's group); NaN for one image."""
        self._require("lpips_diversity")
        if len(images) < 2:
            return math.nan
        first, second = torch.triu_indices(len(images), len(images), offset=1)
        self.lpips.reset()
        for start in range(0, len(first), self.batch_size):
            pairs = slice(start, start + self.batch_size)
            self.lpips.update(self._unit(images[first[pairs]].to(self.device)),
                              self._unit(images[second[pairs]].to(self.device)))
        return float(self.lpips.compute())
