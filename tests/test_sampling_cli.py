"""`pcpo-sample` end to end: a one-epoch pcpo-train run, then samples of the base and of the run.

The run trains with seed 3 and 2 sampler steps, neither of them pcpo-sample's default, so a
sample of the run that matches in-process sampling shows its saved model and sampler were used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcpo_hydra.images import to_uint8
from pcpo_hydra.models.tiny import build_tiny_sd
from pcpo_hydra.samplers import build_ddim_sampler
from pcpo_hydra.sampling.guidance import sample_images

PROMPTS = "prompts=list"  # a red car, a dog on a beach, a bowl of fruit
SMALL = [PROMPTS, "max_prompts=2", "seeds=[5,6]", "batch_size=3", "hardware.num_threads=1"]


def _command(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def pcpo_sample(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command("pcpo_hydra.sampling.cli", *args), cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished one-epoch run of the tiny SD (seed 3, 2 steps), with its .hydra/config.yaml and final_weights."""
    root = tmp_path_factory.mktemp("sample_run")
    run_dir = root / "run"
    result = subprocess.run(
        _command("pcpo_hydra.train", "experiment=debug", "seed=3", "sampler.num_steps=2", "hardware.num_threads=1",
                 "log_images_every=0", f"hydra.run.dir={run_dir}", f"logger.tracking_uri=sqlite:///{root / 'm.db'}",
                 f"text_cache_dir={root / 'cache'}"),
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "final_weights").is_dir() and (run_dir / ".hydra" / "config.yaml").is_file()
    return run_dir


def _expected(weights: Path | None, num_steps: int) -> np.ndarray:
    """The same prompts and seeds sampled in-process: tiny SD of seed 3, its weights, DDIM at eta 0.

    On one thread, as the pcpo-sample runs: a CPU reduction split over more threads can round a
    pixel the other way.
    """
    model = build_tiny_sd(seed=3)
    if weights is not None:
        model.load_trainable(weights)
    sampler = build_ddim_sampler(model, num_steps=num_steps, eta=1.0).deterministic()
    prompts = ["a red car", "a red car", "a dog on a beach", "a dog on a beach"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return to_uint8(sample_images(model, sampler, prompts, [5, 6, 5, 6], batch_size=3))
    finally:
        torch.set_num_threads(threads)


def _written(out: Path) -> tuple[dict, np.ndarray]:
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, np.stack([np.asarray(Image.open(out / e["file"])) for e in manifest["images"]])


@pytest.mark.integration
def test_sample_of_a_run_uses_its_model_sampler_and_weights(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "policy"
    result = pcpo_sample(tmp_path, f"policy={trained_run}", f"out={out}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, pixels = _written(out)
    assert manifest["weights"] == {"policy": str(trained_run / "final_weights")}
    assert [(e["prompt"], e["seed"]) for e in manifest["images"]] == [
        ("a red car", 5), ("a red car", 6), ("a dog on a beach", 5), ("a dog on a beach", 6)]
    first = manifest["images"][0]
    assert first == {"prompt": "a red car", "seed": 5, "policy": str(trained_run), "steps": 2, "guidance": 5.0,
                     "file": "0000_seed5.png"}
    assert np.array_equal(pixels, _expected(trained_run / "final_weights", 2))
    assert not np.array_equal(pixels, _expected(None, 2))  # one epoch of training moved the images


@pytest.mark.integration
def test_sample_of_the_base_model_and_a_zero_weight_irg_policy(trained_run: Path, tmp_path: Path) -> None:
    """policy=null samples the base; the run as an IRG policy at w = 0 brings its model (seed 3) and changes nothing."""
    out = tmp_path / "base"
    result = pcpo_sample(tmp_path, f"irg.policies={{run:{trained_run}}}", "irg.weights={run:0.0}", f"out={out}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, pixels = _written(out)
    assert manifest["policy"] == "base" and manifest["irg"] == {"run": 0.0}
    assert np.array_equal(pixels, _expected(None, 2))


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size=0: must be a number > 0"),
    ("policy=nowhere", "policy='nowhere': no such file or directory; give a run dir or a weights folder"),
    ("irg.weights={aes:1.5}", "irg.weights.aes: names no policy; set irg.policies.aes=<run dir or weights folder>"),
    ("sampler=flowgrpo_sde", "sampler._target_='pcpo_hydra.samplers.build_flowgrpo_sampler': a flow sampler "
                             "cannot step"),
    pytest.param("hardware=gpu1", "hardware.device='cuda': this machine has no NVIDIA GPU (no /dev/nvidia*)",
                 marks=pytest.mark.skipif(bool(glob("/dev/nvidia[0-9]*")), reason="this machine has a GPU")),
])
def test_a_bad_key_fails_in_one_line_with_exit_2(tmp_path: Path, override: str, message: str) -> None:
    result = pcpo_sample(tmp_path, override, f"out={tmp_path / 'never'}")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"pcpo-sample: invalid configuration: {message}")
    assert not (tmp_path / "never" / "manifest.json").exists()
