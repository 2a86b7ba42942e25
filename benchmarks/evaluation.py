"""Seconds of pcpo-eval per 1,000 images: real-size metric networks (random weights), 32 px images, CPU.

    python benchmarks/evaluation.py --images 64 --folders 3 --per-prompt 4 --threads 2

Writes `--folders` sample folders (a reference and policies) of `--images` smooth random images each,
laid out as pcpo-sample writes them, and times pcpo-eval's whole evaluation of them in-process:
loading the networks from their files, every metric, the JPEG reward, per-prompt tables, mixed
models, the report (not MLflow, not the process start). The networks have their real architectures (torch-fidelity's InceptionV3, DINOv2-base,
LPIPS on AlexNet) with random weights, saved where and as the released files are: time does not
depend on the weights' values. The figure counts every image of every folder.

`random_metric_weights` is also what the tests' `metric_weights` fixture uses (with a tiny DINOv2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers
from pcpo_hydra.evaluation import fidelity
from pcpo_hydra.evaluation.compare import evaluate, load_images
from pcpo_hydra.evaluation.config import check_config, image_keys, manifest


def random_inception() -> nn.Module:
    """torchmetrics' InceptionV3 with random weights; its constructor loads a checkpoint, so that load is skipped.

    Kaiming-normal weights keep the activations at unit scale through the 90-odd layers (PyTorch's
    default init shrinks them to ~1e-8, where distances drown in rounding).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module
    from torchmetrics.image.fid import NoTrainInceptionV3

    original, load = inception_module.load_state_dict_from_url, NoTrainInceptionV3.load_state_dict
    inception_module.load_state_dict_from_url = lambda *args, **kwargs: {}
    NoTrainInceptionV3.load_state_dict = lambda self, state, strict=True: None
    try:
        network = fidelity.inception_network(None)
    finally:
        inception_module.load_state_dict_from_url, NoTrainInceptionV3.load_state_dict = original, load
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network


def random_metric_weights(folder: Path, dinov2_config: dict | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(torch_hub, dinov2): random Inception and AlexNet checkpoints under their release names, and a DINOv2
    folder (`dinov2_config` overrides Dinov2Config's defaults, which are DINOv2-base's)."""
    import torchvision
    from transformers import Dinov2Config, Dinov2Model

    checkpoints = folder / "torch_hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(random_inception().state_dict(), checkpoints / fidelity.INCEPTION_URL.rsplit("/", 1)[1])
        torch.save(torchvision.models.alexnet(weights=None).state_dict(),
                   checkpoints / fidelity.ALEXNET_URL.rsplit("/", 1)[1])
        Dinov2Model(Dinov2Config(**(dinov2_config or {}))).save_pretrained(folder / "dinov2")
    return folder / "torch_hub", folder / "dinov2"


def write_folder(out: Path, images: int, per_prompt: int, side: int, seed: int) -> None:
    """A sample folder as pcpo-sample writes it: smooth random PNGs and a manifest."""
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(images, 3, 4, 4, generator=generator)
    pixels = torch.nn.functional.interpolate(low, size=(side, side), mode="bicubic").clamp(0, 1)
    entries = []
    for k, image in enumerate(pixels):
        name = f"{k // per_prompt:04d}_seed{k % per_prompt}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out / name)
        entries.append({"prompt": f"prompt {k // per_prompt}", "seed": k % per_prompt, "policy": out.name,
                        "steps": 10, "guidance": 5.0, "file": name})
    (out / "manifest.json").write_text(json.dumps({"policy": out.name, "model": "random", "images": entries}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per folder")
    parser.add_argument("--folders", type=int, default=3, help="sample folders (the reference and policies)")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt (seeds)")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    register_resolvers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch_hub, dinov2 = random_metric_weights(root / "weights")
        names = ["base", *(f"policy{k}" for k in range(1, args.folders))]
        for k, name in enumerate(names):
            write_folder(root / name, args.images, args.per_prompt, args.side, seed=k)
        samples = "{" + ",".join(f"{name}:{root / name}" for name in names) + "}"
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = check_config(compose("evaluate", overrides=[
                f"samples={samples}", f"weights.torch_hub={torch_hub}", f"weights.dinov2={dinov2}",
                "+reward@rewards.jpeg=jpeg_compressibility", f"out={root / 'report'}", "log_to_mlflow=false",
                f"hardware.num_threads={args.threads}"]))
        started, started_cpu = time.perf_counter(), time.process_time()
        evaluate(cfg, root / "report")
        wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        parts = network_seconds(cfg, load_images(cfg.samples.base, image_keys(manifest(cfg.samples.base))),
                                args.per_prompt)
    total = args.images * args.folders
    print(f"{total} images ({args.folders} folders x {args.images}, {args.per_prompt} per prompt, {args.side} px), "
          f"{args.threads} threads: {wall:.1f} s wall, {cpu:.1f} s CPU")
    print(f"pcpo-eval: {1000 * wall / total:.1f} s per 1,000 images (wall), {1000 * cpu / total:.1f} s CPU")
    for part, seconds in parts.items():
        print(f"  {part}: {1000 * seconds / args.images:.1f} s per 1,000 images")


def network_seconds(cfg, images: torch.Tensor, per_prompt: int) -> dict[str, float]:
    """Wall seconds of each network's pass over one folder's images (the parts of the whole above)."""
    metrics = fidelity.FidelityMetrics.build(cfg.metrics, cfg.weights.torch_hub, cfg.weights.dinov2,
                                             batch_size=cfg.batch_size)
    seconds = {}
    for part, call in (
        ("Inception (FID, IS)", lambda: metrics.features(images, ["fid"])),
        ("DINOv2-base (FD-DINOv2)", lambda: metrics.features(images, ["fd_dinov2"])),
        ("LPIPS diversity", lambda: [metrics.lpips_diversity(images[k:k + per_prompt])
                                     for k in range(0, len(images), per_prompt)]),
    ):
        started = time.perf_counter()
        call()
        seconds[part] = time.perf_counter() - started
    return seconds


if __name__ == "__main__":
    main()
