"""The fidelity metrics on randomly initialised networks of the real classes, loaded through the real loaders.

Values are checked against closed forms (Fréchet distance, Inception Score of one-hot logits) and
against torchmetrics' own metric classes run end to end on the same weights.
"""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from conftest import benchmark_module
from pcpo_hydra.evaluation import fidelity
from pcpo_hydra.evaluation.fidelity import FidelityMetrics, frechet_distance, inception_score_from_logits
import torch_fidelity.feature_extractor_inceptionv3 as torch_fidelity_inception
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

SIDE = 32  # tiny images keep the networks' passes fast on a CPU
INCEPTION_FILE = fidelity.INCEPTION_URL.rsplit("/", 1)[1]
ALEXNET_FILE = fidelity.ALEXNET_URL.rsplit("/", 1)[1]


def images(count: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A torch_hub folder holding random Inception and AlexNet checkpoints, and a tiny DINOv2 folder."""
    import torchvision

    torch.manual_seed(0)
    hub = tmp_path_factory.mktemp("hub")
    (hub / "checkpoints").mkdir()
    for bench in benchmark_module("evaluation"):  # the benchmark's random InceptionV3 (Kaiming-normal weights)
        inception = bench.random_inception()
    torch.save(inception.state_dict(), hub / "checkpoints" / INCEPTION_FILE)
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(alexnet, hub / "checkpoints" / ALEXNET_FILE)
    dino_dir = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          initializer_range=0.5)  # large enough that the CLS token depends on the image
    dinov2 = Dinov2Model(config).eval()
    dinov2.save_pretrained(dino_dir)
    return {"hub": hub, "inception": inception, "alexnet": alexnet, "dino_dir": dino_dir, "dinov2": dinov2}


@pytest.fixture(scope="module")
def metrics(saved: dict) -> FidelityMetrics:
    hub_dir = torch.hub.get_dir()
    built = FidelityMetrics.build(fidelity.METRICS, str(saved["hub"]), str(saved["dino_dir"]), batch_size=8)
    assert torch.hub.get_dir() == hub_dir  # the LPIPS build's hub dir was scoped to it
    return built


def closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), with scipy's matrix square root."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_is_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    expected = closed_form(a, b)
    assert expected > 1
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_of_few_samples_in_many_dimensions_is_exact() -> None:
    """The projection onto the union's span (N + M <= D) changes nothing: checked against the
    symmetric form tr sqrt(S1^1/2 S2 S1^1/2), stable for singular covariances."""

    def psd_root(matrix: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) * 2 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = psd_root(s1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(psd_root(root @ s2 @ root))
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.tensor(a), torch.tensor(a)) == pytest.approx(0, abs=1e-9)
    assert math.isnan(frechet_distance(torch.tensor(a[:1]), torch.tensor(b)))


def test_the_download_urls_are_the_libraries_own() -> None:
    import torchvision

    assert fidelity.INCEPTION_URL == torch_fidelity_inception.URL_INCEPTION_V3
    assert fidelity.ALEXNET_URL == torchvision.models.AlexNet_Weights.DEFAULT.url


def test_the_built_networks_hold_the_saved_weights(saved: dict, metrics: FidelityMetrics) -> None:
    x = images(4, seed=3)
    with torch.inference_mode():
        pool, logits = saved["inception"]._torch_fidelity_forward((x * 255).byte())
        cls = saved["dinov2"](pixel_values=fidelity.dinov2_pixels(x)).last_hidden_state[:, 0]
    found = metrics.features(x)
    torch.testing.assert_close(found["fid"], pool)
    torch.testing.assert_close(found["inception_score"], logits)
    torch.testing.assert_close(found["fd_dinov2"], cls)
    backbone = metrics.lpips.net.net.slice1[0].weight  # torchmetrics' AlexNet slices hold torchvision's features
    torch.testing.assert_close(backbone, saved["alexnet"]["features.0.weight"])


def test_fid_is_zero_for_a_set_with_itself_and_torchmetrics_value_otherwise(saved: dict, metrics: FidelityMetrics) -> None:
    reference, same, other = images(8, seed=0), images(8, seed=0), images(8, seed=1, scale=0.5)
    features = {name: metrics.features(x)["fid"] for name, x in (("reference", reference), ("other", other))}
    distance = frechet_distance(features["reference"], features["other"])
    assert metrics.frechet("fid", reference, same) == pytest.approx(0, abs=1e-6 * distance)
    library = FrechetInceptionDistance(
        normalize=True, feature_extractor_weights_path=str(saved["hub"] / "checkpoints" / INCEPTION_FILE))
    library.update(reference, real=True)
    library.update(other, real=False)
    assert distance > 0.1
    assert distance == pytest.approx(library.compute().item(), rel=1e-3)


def test_fd_dinov2_is_zero_for_a_set_with_itself_and_torchmetrics_value_otherwise(metrics: FidelityMetrics) -> None:
    reference, other = images(6, seed=0), images(6, seed=2, scale=0.3)
    distance = metrics.frechet("fd_dinov2", reference, other)
    assert metrics.frechet("fd_dinov2", reference, reference.clone()) == pytest.approx(0, abs=1e-6 * distance)
    library = FrechetInceptionDistance(feature=metrics.dinov2, normalize=True)
    library.update(reference, real=True)
    library.update(other, real=False)
    assert distance > 0.1
    assert distance == pytest.approx(library.compute().item(), rel=1e-3)


def test_a_metric_without_its_network_is_an_error_and_a_set_of_one_has_no_distance(metrics: FidelityMetrics) -> None:
    with pytest.raises(KeyError, match="lpips_diversity is not available"):
        FidelityMetrics(inception=metrics.inception).lpips_diversity(images(2, seed=0))
    assert FidelityMetrics(inception=metrics.inception).features(images(2, seed=0)).keys() == {"fid", "inception_score"}
    assert math.isnan(metrics.frechet("fid", images(1, seed=0), images(4, seed=1)))


def test_dinov2_pixels_are_dinov2_image_processors() -> None:
    """transformers' BitImageProcessor with facebook/dinov2-base's preprocessor_config.json, on a non-square 8-bit image."""
    processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    # Smooth content, as generated images have: on pixel noise the two 8-bit bicubic paths differ more.
    smooth = nn.functional.interpolate(torch.rand(2, 3, 8, 11, generator=torch.Generator().manual_seed(0)),
                                       size=(40, 57), mode="bilinear")
    pixels = (smooth * 255).round().byte()
    expected = processor(list(pixels), return_tensors="pt")["pixel_values"]
    found = fidelity.dinov2_pixels(pixels.float() / 255)
    assert found.shape == expected.shape == (2, 3, 224, 224)
    # The processor rounds to 8 bit after resizing: half a level, over std 0.225, is 0.009.
    torch.testing.assert_close(found, expected, atol=2e-2, rtol=0)


def test_inception_score_of_random_inception_is_finite_and_at_least_one(metrics: FidelityMetrics) -> None:
    mean, std = metrics.inception_score(images(8, seed=4))
    assert math.isfinite(mean) and math.isfinite(std)
    assert mean >= 1 - 1e-6


def test_inception_score_of_confident_distinct_predictions_is_their_count() -> None:
    """K images each certain of its own class: p(y) is uniform over K, KL = log K, IS = K."""
    confident = 50 * torch.eye(4, 1008)
    mean, std = inception_score_from_logits(confident, splits=1)
    assert mean == pytest.approx(4, rel=1e-4) and math.isnan(std)  # no std over a single split
    assert inception_score_from_logits(confident[[0, 0, 0, 0]], splits=1)[0] == pytest.approx(1, rel=1e-6)


def test_inception_score_shuffles_the_same_way_and_leaves_the_global_rng() -> None:
    logits = torch.randn(12, 1008, generator=torch.Generator().manual_seed(0)) * 5
    state = torch.random.get_rng_state()
    first = inception_score_from_logits(logits)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert inception_score_from_logits(logits) == first
    assert first[0] > 1 and first[1] > 0  # 6 splits of 2: their scores differ


def test_inception_splits_keep_two_images_per_split() -> None:
    assert [fidelity.inception_splits(n) for n in (1, 3, 4, 9, 20, 5000)] == [1, 1, 2, 4, 10, 10]


def test_lpips_diversity(metrics: FidelityMetrics) -> None:
    group = images(3, seed=5)
    assert metrics.lpips_diversity(group[[0, 0, 0]]) == pytest.approx(0, abs=1e-7)
    assert math.isnan(metrics.lpips_diversity(group[:1]))
    with torch.inference_mode():
        pairs = [metrics.lpips.net(group[[i]], group[[j]], normalize=True).item() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert min(pairs) > 0
    assert metrics.lpips_diversity(group) == pytest.approx(sum(pairs) / 3, rel=1e-5)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def hosts_at(monkeypatch: pytest.MonkeyPatch):
    """Point both download URLs at a loopback port (same file names), with no proxy to bypass the probe."""
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)

    def point(port: int) -> None:
        monkeypatch.setattr(fidelity, "HUB_FILES", {
            url.replace(url.split("/")[2], f"127.0.0.1:{port}"): users for url, users in fidelity.HUB_FILES.items()})

    return point


def test_weight_problems_name_each_missing_file_and_the_key(hosts_at, tmp_path: Path, saved: dict) -> None:
    hosts_at(closed_port())
    start = time.perf_counter()
    problems = fidelity.weight_problems(fidelity.METRICS, str(tmp_path), str(saved["dino_dir"]))
    assert time.perf_counter() - start < 2.0  # refused at once
    assert len(problems) == 2
    inception, alexnet = problems
    assert inception.startswith(f"metrics fid, inception_score: {INCEPTION_FILE} is not in {tmp_path / 'checkpoints'} and 127.0.0.1:")
    assert inception.endswith(f"set weights.torch_hub=<folder holding checkpoints/{INCEPTION_FILE}>")
    assert alexnet.startswith(f"metric lpips_diversity: {ALEXNET_FILE} is not in")
    assert "weights.torch_hub" in alexnet
    assert fidelity.weight_problems(["fd_dinov2"], str(tmp_path), str(saved["dino_dir"])) == []
    assert fidelity.weight_problems(fidelity.METRICS, str(saved["hub"]), str(saved["dino_dir"])) == []


def test_no_weight_problem_when_the_download_host_answers(hosts_at, tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hosts_at(server.getsockname()[1])
        assert fidelity.weight_problems(["fid", "lpips_diversity"], str(tmp_path), "unused") == []


def test_a_missing_dinov2_folder_is_one_line_naming_its_key(tmp_path: Path) -> None:
    (problem,) = fidelity.weight_problems(["fd_dinov2"], None, str(tmp_path / "absent"))
    assert "metric fd_dinov2" in problem and "set weights.dinov2=" in problem and str(tmp_path / "absent") in problem
    with pytest.raises(ValueError, match="unknown fidelity metric.*fdd"):
        fidelity.weight_problems(["fdd"], None, "x")


def test_eight_bit_images_are_read_at_their_exact_levels(metrics: FidelityMetrics) -> None:
    """A sample folder's PNGs arrive as 8 bits: Inception gets those levels, not a truncated float round trip."""
    levels = (images(4, seed=5) * 255).round().byte()
    exact = metrics.features(levels)
    nudged = metrics.features(levels.float() / 255 + 1e-4)  # k / 255 + 1e-4: truncates back to k
    assert torch.equal(exact["fid"], nudged["fid"]) and torch.equal(exact["inception_score"], nudged["inception_score"])
    assert torch.allclose(exact["fd_dinov2"], metrics.features(levels.float() / 255)["fd_dinov2"])
    assert metrics.lpips_diversity(levels) == pytest.approx(metrics.lpips_diversity(levels.float() / 255))
