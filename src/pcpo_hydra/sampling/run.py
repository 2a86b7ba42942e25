"""What `pcpo-sample` does once its config is checked: build the mixture, sample every (prompt, seed), write it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pcpo_hydra.build import build
from pcpo_hydra.distributed import weight_dtype
from pcpo_hydra.images import to_pil
from pcpo_hydra.sampling.config import MANIFEST, irg_weights, sources
from pcpo_hydra.sampling.sources import matched_checkpoint, source_runs
from pcpo_hydra.sampling.guidance import GuidedModel, PolicyLoadError, load_policy, sample_images
from pcpo_hydra.samplers.base import instantiate_sampler

__all__ = ["MANIFEST", "PolicyLoadError", "build_guided", "jobs", "log_samples", "write_samples"]



def build_guided(cfg: DictConfig, folders: dict[str, Path | None]) -> tuple[Any, Any, GuidedModel]:
    """(base model, sampler, mixture): `policy` at weight 1, each IRG policy at its `irg.weights` value.

    A policy without weights (matched at epoch 0: the base model itself) adds f_base - f_base = 0: left out.
    """
    folders = {name: folder for name, folder in folders.items() if folder is not None}
    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(cfg.hardware.num_threads)
    model = build(cfg.model)
    model.to(cfg.hardware.device, weight_dtype(cfg.hardware))
    sampler = instantiate_sampler(cfg.sampler, model)
    if cfg.deterministic:
        sampler = sampler.deterministic()
    weights = {name: 1.0 if name == "policy" else irg_weights(cfg)[name] for name in folders}
    loaded = {name: load_policy(model, name, folder) for name, folder in folders.items()}
    return model, sampler, GuidedModel(model, loaded, weights)


def jobs(cfg: DictConfig) -> list[tuple[int, str, int]]:
    """(prompt index, prompt, seed) for the first `max_prompts` prompts, each with every seed."""
    prompts = instantiate(cfg.prompts)
    count = len(prompts) if cfg.max_prompts is None else min(cfg.max_prompts, len(prompts))
    return [(k, prompts[k], int(seed)) for k in range(count) for seed in cfg.seeds]


def _matches(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """{policy name: the checkpoint `match.reward` chose (run dir, epoch, its eval reward)} for run-dir sources."""
    found = {}
    for key, source in sources(cfg).items():
        match = matched_checkpoint(source, key, cfg.match)
        if match is not None:
            found[key.rpartition(".")[2]] = {"run_dir": str(match.run_dir.resolve()), "epoch": match.epoch,
                                             "eval_reward": match.reward, "target": cfg.match.reward,
                                             "pick": match.pick}
    return found


def write_samples(cfg: DictConfig, out: Path, folders: dict[str, Path | None]) -> dict[str, Any]:
    """Sample every job into `out` as PNGs and write manifest.json (what each file is) last; return it."""
    model, sampler, guided = build_guided(cfg, folders)
    todo = jobs(cfg)
    prompts, seeds = [p for _, p, _ in todo], [s for _, _, s in todo]
    with tqdm(total=len(todo), desc="images", unit="img") as bar:
        images = sample_images(model, sampler, prompts, seeds, cfg.batch_size, predict=guided.predict,
                               on_batch=bar.update)
    out.mkdir(parents=True, exist_ok=True)
    label = cfg.policy or "base"
    entries = []
    for (k, prompt, seed), image in zip(todo, to_pil(images)):
        name = f"{k:04d}_seed{seed}.png"
        image.save(out / name)
        entries.append({"prompt": prompt, "seed": seed, "policy": label, "steps": sampler.num_steps,
                        "guidance": model.guidance_scale, "file": name})
    manifest = {
        "policy": label,
        "sources": {key.rpartition(".")[2]: str(Path(source).resolve()) for key, source in sources(cfg).items()},
        "weights": {name: None if folder is None else str(folder) for name, folder in folders.items()},
        "matches": _matches(cfg),
        "irg": irg_weights(cfg),
        "model": cfg.model._target_, "sampler": cfg.sampler._target_, "deterministic": cfg.deterministic,
        "images": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def log_samples(cfg: DictConfig, out: Path, manifest: dict[str, Any]) -> str:
    """Log the sample folder as an MLflow run tagged with the training run of each run-dir policy; its id."""
    tracker = instantiate(cfg.logger)
    tags = {"pcpo.kind": "samples", "policy": manifest["policy"], "out": str(out.resolve())}
    tags.update({f"source_run.{name}": run_id for name, run_id in source_runs(manifest, cfg.logger).items()})
    params = {"seeds": list(cfg.seeds), "steps": manifest["images"][0]["steps"], "deterministic": cfg.deterministic,
              "irg": manifest["irg"], "match": manifest["matches"], "model": manifest["model"],
              "sampler": manifest["sampler"], "images": len(manifest["images"])}
    run_id = tracker.start(None, {key: json.dumps(value) for key, value in params.items()}, tags)
    try:
        tracker.log_artifact(out, "samples")
    finally:
        tracker.end("FINISHED")
    return run_id
