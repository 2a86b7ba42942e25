"""What `pcpo-eval` does once its config is checked: measure every sample folder, model the differences, report.

Per image: each reward of the suite. Per (policy, prompt): the rewards' means, LPIPS diversity of
the prompt's images, and FID / FD-DINOv2 of those images against the reference's images of the same
prompt (few images per prompt make these noisy; the mixed models pool them over prompts). Overall,
per policy: FID and FD-DINOv2 of all its images against all the reference's, Inception Score, the
mean per-prompt diversity and the rewards. Each per-prompt metric then gets a linear mixed model
(policy fixed, prompt random), and everything goes into CSVs and a markdown report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from pcpo_hydra.build import build
from pcpo_hydra.evaluation.config import image_files, image_keys, manifest
from pcpo_hydra.evaluation.fidelity import FRECHET, FidelityMetrics, frechet_distance, inception_score_from_logits
from pcpo_hydra.evaluation.report import write_report
from pcpo_hydra.evaluation.statistics import mixed_models, per_prompt_table
from pcpo_hydra.images import from_uint8
from pcpo_hydra.sampling.sources import source_runs

PER_IMAGE, PER_PROMPT, OVERALL, MODELS = "per_image.csv", "per_prompt.csv", "overall.csv", "mixed_models.csv"


def load_images(folder: str, order: list[tuple[str, int]]) -> Tensor:
    """The folder's images as 8 bits [N, 3, H, W], in the (prompt, seed) order given (a quarter of floats' memory)."""
    files = image_files(manifest(folder))
    pixels = np.stack([np.asarray(Image.open(Path(folder) / files[key]).convert("RGB")) for key in order])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _rows(prompts: list[str]) -> dict[str, list[int]]:
    """Image indices of each prompt, prompts in first-seen order."""
    rows: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        rows.setdefault(prompt, []).append(index)
    return rows


class Comparison:
    """One pcpo-eval: the folders' images, the networks and rewards, and the tables they give."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.order = image_keys(manifest(cfg.samples[cfg.reference]))
        self.prompts = [prompt for prompt, _ in self.order]
        self.names = [cfg.reference, *(name for name in cfg.samples if name != cfg.reference)]
        self.images = {name: load_images(cfg.samples[name], self.order) for name in self.names}
        self.device = cfg.hardware.device
        self.fidelity = FidelityMetrics.build(cfg.metrics, cfg.weights.torch_hub, cfg.weights.dinov2,
                                              self.device, cfg.batch_size) if cfg.metrics else None
        self.rewards = {name: build(node) for name, node in cfg.rewards.items()}  # a ModelLoadError as itself

    def per_image(self) -> pd.DataFrame:
        """policy, prompt, seed, file and one column per reward."""
        frames = []
        for name in self.names:
            scores = {reward: self._score(model, self.images[name]) for reward, model in self.rewards.items()}
            files = image_files(manifest(self.cfg.samples[name]))
            frames.append(pd.DataFrame({"policy": name, "prompt": self.prompts, "seed": [s for _, s in self.order],
                                        "file": [files[key] for key in self.order], **scores}))
        return pd.concat(frames, ignore_index=True)

    def _score(self, reward: Any, images: Tensor) -> np.ndarray:
        """The reward of every image, `batch_size` images (as floats in [0, 1]) at a time."""
        size, scores = self.cfg.batch_size, []
        with torch.no_grad():
            for start in range(0, len(images), size):
                chunk = from_uint8(images[start:start + size].permute(0, 2, 3, 1).numpy()).to(self.device)
                scores.append(reward.score_parts(chunk, self.prompts[start:start + size])[0].float().cpu())
        return torch.cat(scores).numpy()

    def fidelity_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(per (policy, prompt) fidelity and diversity, per policy overall fidelity, IS and diversity)."""
        wanted = set(self.cfg.metrics)
        features = {name: self.fidelity.features(self.images[name]) for name in self.names}
        rows = _rows(self.prompts)
        reference = features[self.cfg.reference]
        per_prompt, overall = [], []
        for name in self.names:
            policy = {"policy": name}
            for metric in FRECHET:
                if metric in wanted:
                    policy[metric] = (math.nan if name == self.cfg.reference
                                      else frechet_distance(reference[metric], features[name][metric]))
            if "inception_score" in wanted:
                policy["inception_score"], policy["inception_score_std"] = inception_score_from_logits(
                    features[name]["inception_score"])
            prompt_rows = []
            for prompt, index in rows.items():
                row = {"policy": name, "prompt": prompt}
                for metric in FRECHET:
                    if metric in wanted:
                        row[metric] = (math.nan if name == self.cfg.reference
                                       else frechet_distance(reference[metric][index], features[name][metric][index]))
                if "lpips_diversity" in wanted:
                    row["lpips_diversity"] = self.fidelity.lpips_diversity(self.images[name][index])
                prompt_rows.append(row)
            if "lpips_diversity" in wanted:
                policy["lpips_diversity"] = float(np.nanmean([r["lpips_diversity"] for r in prompt_rows]))
            per_prompt += prompt_rows
            overall.append(policy)
        return pd.DataFrame(per_prompt), pd.DataFrame(overall)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table pcpo-eval writes: per image, per prompt, overall, mixed models."""
        per_image = self.per_image()
        reward_names = list(self.rewards)
        per_prompt = per_prompt_table(per_image, reward_names)
        summary = per_image.groupby("policy", sort=False).agg(
            n_images=("seed", "size"), n_prompts=("prompt", "nunique"),
            **{f"{r}_{stat}": (r, stat) for r in reward_names for stat in ("mean", "std")})
        overall = summary.reset_index()
        if self.fidelity is not None:
            prompt_fidelity, policy_fidelity = self.fidelity_tables()
            per_prompt = per_prompt.merge(prompt_fidelity, on=["policy", "prompt"])
            overall = overall.merge(policy_fidelity, on="policy")
        metrics = [c for c in per_prompt.columns if c not in ("policy", "prompt", "n_images")]
        baseline = self.cfg.baseline or self.cfg.reference
        models = mixed_models(per_prompt, metrics, baseline, self.names)
        return {PER_IMAGE: per_image, PER_PROMPT: per_prompt, OVERALL: overall, MODELS: models}


def _notes(cfg: DictConfig) -> list[str]:
    """What the report's reader needs to read the numbers: the reference, the weights, where each folder came from."""
    notes = [f"Fidelity (FID, FD-DINOv2) is measured against `{cfg.reference}`'s images of the same prompts and "
             "seeds; per prompt it rests on that prompt's few images, overall on all of them."]
    for name, folder in cfg.samples.items():
        found = manifest(folder)
        matched = "; ".join(f"{k}: epoch {m['epoch']} (eval reward {m['eval_reward']:.4g}, target {m['target']})"
                            for k, m in found.get("matches", {}).items())
        notes.append(f"`{name}`: {folder} (policy {found['policy']}, {found['model']}"
                     + (f"; matched checkpoint {matched}" if matched else "") + ")")
    return notes


def evaluate(cfg: DictConfig, out: Path) -> tuple[Path, dict[str, pd.DataFrame]]:
    """Measure, write the CSVs and the report into `out`; return the report's path and the tables."""
    if cfg.hardware.num_threads is not None:
        torch.set_num_threads(cfg.hardware.num_threads)
    tables = Comparison(cfg).tables()
    out.mkdir(parents=True, exist_ok=True)
    for file, table in tables.items():
        table.to_csv(out / file, index=False)
    title = f"pcpo-eval: {', '.join(cfg.samples)}"
    report = write_report(out, title, tables[OVERALL], tables[MODELS], PER_PROMPT, _notes(cfg))
    return report, tables


def log_evaluation(cfg: DictConfig, out: Path, overall: pd.DataFrame) -> str:
    """Log the report folder and each policy's overall numbers as an MLflow run, tagged with its source runs."""
    tracker = instantiate(cfg.logger)
    tags = {"pcpo.kind": "evaluation", "out": str(out.resolve())}
    for name, folder in cfg.samples.items():
        found = manifest(folder)
        tags[f"samples.{name}"] = str(Path(folder).resolve())
        tags.update({f"source_run.{name}.{key}": value for key, value in source_runs(found, cfg.logger).items()})
    params = {"samples": json.dumps(OmegaConf.to_container(cfg.samples)), "reference": cfg.reference,
              "metrics": json.dumps(list(cfg.metrics)), "rewards": json.dumps(list(cfg.rewards))}
    run_id = tracker.start(None, params, tags)
    try:
        numbers = overall.set_index("policy").select_dtypes("number")
        tracker.log_metrics({f"{policy}/{metric}": float(value) for policy, row in numbers.iterrows()
                             for metric, value in row.items() if np.isfinite(value)}, step=0)
        tracker.log_artifact(out, "evaluation")
    finally:
        tracker.end("FINISHED")
    return run_id

