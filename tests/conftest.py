"""Shared fixtures: compose the real config tree exactly as `pcpo-train` does."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers

register_resolvers()  # conf/train.yaml's hydra node reads through them, as under pcpo-train

SHAPES_WORLD = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes_world"


def _shapes_world_importable() -> None:
    """The shapes-world plugin's tests run whether it is installed (CI) or not (the README's `[test]` install).

    Not installed, its folder goes on sys.path, for this process (where Hydra scans `hydra_plugins` on
    its first compose, after this), and on PYTHONPATH, for the `pcpo-train` subprocesses tests start.
    """
    if importlib.util.find_spec("pcpo_shapes_world") is not None:
        return
    sys.path.append(str(SHAPES_WORLD))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(SHAPES_WORLD))))


_shapes_world_importable()


def shapes_world_conf() -> Path:
    """The plugin's conf/ as Hydra reads it (the installed copy in CI, else benchmarks/shapes_world's)."""
    import pcpo_shapes_world

    return Path(pcpo_shapes_world.__file__).resolve().parent / "conf"


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg("algorithm=grpo", ...) -> the composed (not yet validated) config."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py imported as module `name` (scripts are no package), removed again afterwards."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


CLIP_SIDE = 24
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP with a character-level tokenizer and CLIP's own image transform at 24 px."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pcpo_hydra.models.tiny import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4,
                     "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": CLIP_SIDE, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIDE}, crop_size={"height": CLIP_SIDE, "width": CLIP_SIDE},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)
    return folder


REFERENCE = Path(__file__).resolve().parent / "reference"


def reference_python(name: str) -> Path:
    """The interpreter of a venv holding a reward's reference package (tests/reference/<name>.txt).

    The authors' packages pin versions ours cannot share (image-reward wants timm 0.6, open_clip timm 1.x;
    both want torchvision), so each lives in its own venv, built once per requirements file and reused
    (under $PCPO_REFERENCE_VENVS, else ~/.cache/pcpo-hydra/reference-venvs). A venv that cannot be
    built skips the test here and fails it in CI, which must run these comparisons.
    """
    import hashlib
    import os
    import subprocess

    requirements = REFERENCE / f"{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("PCPO_REFERENCE_VENVS", Path.home() / ".cache" / "pcpo-hydra" / "reference-venvs"))
    venv = root / f"{name}-{digest}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        # torch first, pinned alone: resolving it with the rest could pick a newer (CUDA) build
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True,
                       capture_output=True, text=True)
        # --no-deps: the file is the whole environment; the packages' own requirements name their training stacks
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", str(requirements)], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        reason = f"reference venv {name!r} could not be built: {(error.stderr or '').strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    (venv / ".complete").touch()
    return python


def run_reference(name: str, script: str, *args: str) -> None:
    """Run tests/reference/<script> with the reference venv of `name`; its output files are the result."""
    import subprocess

    result = subprocess.run([str(reference_python(name)), str(REFERENCE / script), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"


def reference_inputs(folder: Path) -> tuple[list[Tensor], list[str]]:
    """Images and prompts that exercise a reward's preprocessing and tokenizer, written for a reference script.

    Noisy and smooth images of odd sizes (so resizing, padding and cropping all run), and prompts
    with HTML entities, mojibake, odd whitespace and more than 77 tokens. Saved as folder/images.npz
    (uint8 HWC arrays, in order) and folder/prompts.json; returned as [1, 3, H, W] floats and strings.
    """
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:64, 0:33]
    disc = ((rows - 40) ** 2 + (cols - 15) ** 2 < 150)[..., None] * np.array([200, 40, 30]) + 30
    images = [
        rng.integers(0, 256, (37, 23, 3)),  # noise
        rng.integers(0, 2, (20, 45, 3)) * 255,  # black and white noise: bicubic overshoots most on it
        np.broadcast_to(np.linspace(0, 255, 50)[None, :, None], (50, 50, 3)),  # a smooth gradient
        rng.integers(0, 256, (32, 32, 3)),  # square noise
        np.clip(disc + rng.normal(0, 8, (64, 33, 3)), 0, 255),  # an ordinary picture: a red disc, a little noise
    ]
    images = [np.ascontiguousarray(image).round().astype(np.uint8) for image in images]
    prompts = [
        "a red fox &amp; a blue car",
        "caf\u00c3\u00a9 terrace at night, &lt;b&gt;bold&lt;/b&gt;",  # mojibake of "cafe", escaped HTML
        "a  photo\tof \u2003 a cat&nbsp;on a mat",
        " ".join(["a very long prompt about a lighthouse on a cliff"] * 12),  # past 77 tokens
        "Plain prompt",
    ]
    np.savez(folder / "images.npz", **{f"image{i}": image for i, image in enumerate(images)})
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return [torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 for image in images], prompts


@pytest.fixture(scope="module")
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store per test module, holding the module's EXPERIMENT (making its tables is slow)."""
    from pcpo_hydra.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/store/mlflow.db"
    MLflowTracker(uri, request.module.EXPERIMENT)
    return uri


@pytest.fixture(scope="session")
def metric_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(torch_hub, dinov2): pcpo-eval's metric networks with random weights, saved where and as the real ones are.

    torch_hub/checkpoints holds torch-fidelity's InceptionV3 file and torchvision's AlexNet file under
    their release names; dinov2/ is a two-layer Dinov2Model (benchmarks/evaluation.py builds them).
    """
    # initializer_range: large enough that the tiny model's CLS token depends on the image
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "initializer_range": 0.5}
    for module in benchmark_module("evaluation"):
        return module.random_metric_weights(tmp_path_factory.mktemp("metric_weights"), tiny)
