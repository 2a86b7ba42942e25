"""Pretrain the shapes world's base models, cache them as pipeline folders, and show they follow captions.

    python benchmarks/pretrain_world.py                      # VAE, then SD and SD3 into outputs/world_models/
    python benchmarks/pretrain_world.py --steps 3000 --force # longer, replacing the cache
    pcpo-train model=world_sd prompts=world reward=world_all # then fine-tune one (model=world_sd3: the flow one)

The pcpo-train options are the shapes-world plugin's: `pip install ./benchmarks/shapes_world` first.

Writes <out>/vae (the AutoencoderKL both share), <out>/sd and <out>/sd3 (diffusers pipeline folders
that `load_stable_diffusion` / `load_sd3` read, as the plugin's conf/model/world_sd*.yaml do), <out>/<name>_samples.png
(a captioned grid: ground truth, then the model's samples of the same captions) and
<out>/<name>_report.json. A part already in the cache is kept unless --force.

Each model is judged through the loaders and samplers `pcpo-train` builds from conf/ (the tiny
recipes' 10 steps; SD with DDIM eta 1, SD3 with Flow-GRPO's and DanceGRPO's SDEs): the world
rewards' means on its samples, beside the same captions rendered by the world (ground truth) and
uniform noise images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pcpo_hydra.build import build
from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.image_grid import make_grid
from pcpo_hydra.models.base import PolicyModel
from pcpo_hydra.rollout import sample_trajectories
from pcpo_hydra.samplers import BaseSampler
from pcpo_hydra.samplers.base import instantiate_sampler
from diffusers import AutoencoderKL  # after pcpo_hydra, which lets a CPU torch's PyPI torchvision import (torchvision_compat)

# The shapes world is a plugin: an installed copy (pip install ./benchmarks/shapes_world) comes first,
# else the one beside this script (which also puts its conf/ on Hydra's search path).
sys.path.append(str(Path(__file__).resolve().parent / "shapes_world"))
from pcpo_shapes_world import pretrain  # noqa: E402
from pcpo_shapes_world.grammar import all_attributes  # noqa: E402
from pcpo_shapes_world.models import RESOLUTION, build_world_sd, build_world_sd3, world_vae  # noqa: E402
from pcpo_shapes_world.render import render  # noqa: E402
from pcpo_shapes_world.rewards import caption_agreements  # noqa: E402
from pcpo_shapes_world.scenes import sample_scenes  # noqa: E402

REWARDS = caption_agreements()
SAMPLE_BATCH = 32
VAE_LR = 3e-3
EVAL_SEED = 12345  # scenes and sampling noise of the evaluation; pretraining data uses --seed


@dataclass(frozen=True)
class Family:
    """How one base model is built, trained, loaded and sampled."""

    name: str
    build: Callable[[AutoencoderKL, int], PolicyModel]   # (trained VAE, seed) -> fresh model
    objective: pretrain.Objective                        # epsilon_loss (SD) | velocity_loss (SD3)
    shift: bool            # whether its VAE shifts latents (SD3) or only scales them (SD)
    lr: float
    model_option: str      # conf/model/<option>.yaml
    samplers: tuple[str, ...]
    steps: int             # default optimizer steps (--steps overrides): ~5.5 minutes each on 2 CPU cores


FAMILIES = {
    "sd": Family("sd", build_world_sd, pretrain.epsilon_loss, False, 2e-3, "world_sd", ("ddim",), 1000),
    "sd3": Family("sd3", build_world_sd3, pretrain.velocity_loss, True, 2e-3, "world_sd3",
                  ("flowgrpo_sde", "dancegrpo_sde"), 1600),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/world_models"), help="cache folder")
    parser.add_argument("--models", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=None, help="denoiser optimizer steps per model (default: sd 1000, sd3 1600)")
    parser.add_argument("--vae-steps", type=int, default=600, help="VAE optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", type=int, default=4096, help="world scenes rendered for pretraining")
    parser.add_argument("--eval-samples", type=int, default=64, help="captions sampled per evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--force", action="store_true", help="retrain and overwrite cached parts")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, flush=True)


def cached(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def vae_of(
    args: argparse.Namespace, data: pretrain.WorldData, generator: torch.Generator
) -> tuple[AutoencoderKL, pretrain.TrainLog | None]:
    """The shared VAE: from the cache, or trained as an autoencoder on the world and cached."""
    folder = args.out / "vae"
    if cached(folder, "config.json") and not args.force:
        log(f"vae: cached in {folder}")
        return AutoencoderKL.from_pretrained(folder), None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        vae = world_vae()
    trained = pretrain.train_vae(vae, data, args.vae_steps, args.batch_size, VAE_LR, generator)
    log(f"vae: {args.vae_steps} steps in {trained.seconds:.0f} s; loss by fifths {fmt(trained.summary())}")
    vae.save_pretrained(folder)
    return vae, trained


def pretrain_family(
    family: Family, args: argparse.Namespace, data: pretrain.WorldData, vae: AutoencoderKL, generator: torch.Generator
) -> pretrain.TrainLog:
    latents = pretrain.encode(vae, data)
    policy = family.build(pretrain.with_latent_scale(vae, latents, family.shift), args.seed)
    steps = args.steps or family.steps
    trained = pretrain.train_denoiser(
        policy, family.objective, data, latents, steps, args.batch_size, family.lr, generator
    )
    log(f"{family.name}: {steps} steps in {trained.seconds:.0f} s; loss by fifths {fmt(trained.summary())}")
    policy.save_pretrained(args.out / family.name)
    return trained


def built_as_pcpo_train(family: Family, folder: Path, sampler: str) -> tuple[PolicyModel, BaseSampler]:
    """Model and sampler exactly as `pcpo-train model=<world option> sampler=<sampler>` builds them."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose("train", [
            f"model={family.model_option}", f"model.pretrained={folder}", f"sampler={sampler}",
            "prompts=world", "text_cache_dir=null",
        ]))
    model = build(cfg.model)
    return model, instantiate_sampler(cfg.sampler, model)


def reward_means(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    means = {reward.name: reward(images, captions).mean().item() for reward in REWARDS}
    means["world_all"] = sum(means.values()) / len(REWARDS)
    return means


def evaluate(family: Family, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """World rewards on ground truth, noise and the cached model's samples under each of its samplers."""
    scenes = sample_scenes(args.eval_samples, EVAL_SEED, all_attributes())
    captions = [scene.caption for scene in scenes]
    truth = render(scenes, RESOLUTION)
    noise = torch.rand(truth.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    table = {"ground truth": reward_means(truth, captions), "noise": reward_means(noise, captions)}
    grids = [truth[:16]]
    for sampler_name in family.samplers:
        model, sampler = built_as_pcpo_train(family, args.out / family.name, sampler_name)
        start = time.perf_counter()
        generators = [torch.Generator().manual_seed(EVAL_SEED + k) for k in range(0, len(captions), SAMPLE_BATCH)]
        images = sample_trajectories(model, sampler, captions, SAMPLE_BATCH, generators).images
        log(f"{family.name}: {len(captions)} samples with {sampler_name} in {time.perf_counter() - start:.1f} s")
        table[f"samples ({sampler_name})"] = reward_means(images, captions)
        grids.append(images[:16])
    labels = [f"{c} ({row})" for row in ["truth", *family.samplers] for c in captions[:16]]
    make_grid(torch.cat(grids), labels, columns=8).save(args.out / f"{family.name}_samples.png")
    return table


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def print_table(name: str, table: dict[str, dict[str, float]]) -> None:
    columns = list(next(iter(table.values())))
    log(f"\n{name}: world reward means ({' | '.join(columns)})")
    for row, values in table.items():
        log(f"  {row:<24} " + "  ".join(f"{values[c]:.3f}" for c in columns))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    data = pretrain.world_data(args.data, args.seed, RESOLUTION)
    log(f"data: {len(data)} world renders in {time.perf_counter() - start:.1f} s")
    vae, vae_log = vae_of(args, data, generator)
    for name in args.models:
        family = FAMILIES[name]
        report_file = args.out / f"{name}_report.json"
        if cached(args.out / name, "model_index.json") and not args.force and vae_log is None:
            log(f"{name}: cached in {args.out / name}")
            report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        else:
            report = {}
            trained = pretrain_family(family, args, data, vae, generator)
            report["train"] = {"steps": len(trained.losses), "seconds": trained.seconds, "loss_by_fifths": trained.summary()}
        report["rewards"] = table = evaluate(family, args)
        print_table(name, table)
        report_file.write_text(json.dumps(report, indent=2))
    log(f"\ntotal {time.perf_counter() - start:.0f} s; models in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
