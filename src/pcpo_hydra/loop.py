"""The one generic loop: rollout -> reward -> advantage -> update -> log -> checkpoint, per epoch."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pcpo_hydra.checkpoint import save_checkpoint
from pcpo_hydra.rollout import Trajectories, sample_trajectories
from pcpo_hydra.update import update_policy

log = logging.getLogger(__name__)

GRID_IMAGES = 16  # samples shown in a logged grid


@dataclass
class Components:
    """The parts a run is made of; the loop meets them only through their small interfaces."""

    model: Any
    sampler: Any        # the rollout sampler (PCPO's variance mode may have changed its stds)
    reward: Any
    algorithm: Any      # .policy (losses) and .advantages (reward -> advantage)
    prompts: Any
    optimizer: torch.optim.Optimizer


def reward_stats(prefix: str, rewards: Tensor) -> dict[str, float]:
    """Mean, std, min and max of the finite rewards (NaN if none) and how many were NaN or inf."""
    finite = rewards[torch.isfinite(rewards)].float()
    if not len(finite):
        finite = torch.full((1,), float("nan"))
    return {
        f"{prefix}_mean": finite.mean().item(),
        f"{prefix}_std": finite.std(unbiased=False).item(),
        f"{prefix}_min": finite.min().item(),
        f"{prefix}_max": finite.max().item(),
        f"{prefix}_nonfinite": float((~torch.isfinite(rewards)).sum()),
    }


class Trainer:
    """Runs epochs and owns everything a resumed run must restore (epoch, RNG streams)."""

    def __init__(
        self, cfg: DictConfig, parts: Components, accelerator: Accelerator, tracker: Any, run_dir: Path
    ) -> None:
        self.cfg, self.parts, self.accelerator, self.tracker = cfg, parts, accelerator, tracker
        self.run_dir = Path(run_dir)
        self.epoch = 0              # epochs completed
        self.logged_through = 0     # epochs already in the tracker (a resumed run skips them)
        self.noise_generator = torch.Generator(accelerator.device).manual_seed(cfg.seed)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "noise_generator": self.noise_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "advantages": self.parts.algorithm.advantages.state_dict(),
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.noise_generator.set_state(state["noise_generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.parts.algorithm.advantages.load_state_dict(state["advantages"])

    # ------------------------------------------------------------------------------- phases

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings[phase] = time.perf_counter() - start

    def draw_prompts(self) -> list[str]:
        """`prompts_per_epoch` prompts drawn with replacement, each repeated `group_size` times."""
        rollout, prompts = self.cfg.rollout, self.parts.prompts
        picks = torch.randint(len(prompts), (rollout.prompts_per_epoch,), generator=self.shuffle_generator)
        return [prompts[int(k)] for k in picks for _ in range(rollout.group_size)]

    def rollout(self) -> Trajectories:
        with self.timed("rollout"):
            self.parts.model.network.eval()
            return sample_trajectories(
                self.parts.model, self.parts.sampler, self.draw_prompts(),
                self.cfg.rollout.batch_size, self.noise_generator,
            )

    def score(self, traj: Trajectories) -> None:
        with self.timed("reward"):
            rewards, traj.extras["reward_parts"] = self.parts.reward.score_parts(traj.images, traj.prompts)
            traj.rewards = rewards.to(device=traj.latents.device, dtype=torch.float32)
            traj.advantages = self.parts.algorithm.advantages(traj.prompts, traj.rewards)

    def update(self, traj: Trajectories) -> dict[str, float]:
        with self.timed("update"):
            self.parts.model.network.train()
            return update_policy(
                traj, self.parts.model, self.parts.sampler, self.parts.algorithm.policy,
                self.parts.optimizer, self.accelerator, self.cfg.train, self.shuffle_generator,
            )

    # ------------------------------------------------------------------------------- loop

    def run_epoch(self) -> tuple[Trajectories, dict[str, float]]:
        """One rollout -> reward -> advantage -> update pass, timed by phase and in total."""
        start = time.perf_counter()
        traj = self.rollout()
        self.score(traj)
        train_stats = self.update(traj)
        self.timings["epoch"] = time.perf_counter() - start
        return traj, train_stats

    def fit(self) -> float:
        """Train from the epoch after the last completed one to `cfg.epochs`; return the last reward mean."""
        metrics: dict[str, float] = {}
        epochs = range(self.epoch + 1, self.cfg.epochs + 1)
        bar = tqdm(epochs, desc="epochs", disable=not self.accelerator.is_main_process)
        with logging_redirect_tqdm():
            for epoch in bar:
                traj, train_stats = self.run_epoch()
                metrics = self.epoch_metrics(traj, train_stats)
                self.log_epoch(epoch, metrics, traj)
                self.epoch = epoch
                self.maybe_checkpoint(epoch)
        return metrics.get("rollout/reward_mean", float("nan"))

    # ------------------------------------------------------------------------------- outputs

    def epoch_metrics(self, traj: Trajectories, train_stats: dict[str, float]) -> dict[str, float]:
        adv = traj.advantages
        metrics = {
            **reward_stats("rollout/reward", traj.rewards),
            "rollout/advantage_mean": adv.mean().item(),
            "rollout/advantage_std": adv.std(unbiased=False).item(),
            "rollout/advantage_abs_max": adv.abs().max().item(),
            "train/lr": self.parts.optimizer.param_groups[0]["lr"],
            **train_stats,
        }
        for name, values in traj.extras["reward_parts"].items():
            metrics.update(reward_stats(f"reward/{name}", values))
        for name, count in self.parts.model.text_cache.take_counts().items():
            metrics[f"text_cache/{name}"] = count
        metrics.update({f"time/{phase}_s": seconds for phase, seconds in self.timings.items()})
        metrics["perf/images_per_s"] = len(traj) / self.timings["epoch"]
        return metrics

    def log_epoch(self, epoch: int, metrics: dict[str, float], traj: Trajectories) -> None:
        """Console line always; tracker (rank 0) only for epochs it does not have yet."""
        if not self.accelerator.is_main_process:
            return
        t = self.timings
        log.info(
            "epoch %d/%d | reward %.4g ± %.3g | clipfrac %.3f | kl %.2e | %.1fs (rollout %.1f, reward %.1f, update %.1f)",
            epoch, self.cfg.epochs, metrics["rollout/reward_mean"], metrics["rollout/reward_std"],
            metrics.get("train/clipfrac", float("nan")), metrics.get("train/approx_kl", float("nan")),
            t["epoch"], t["rollout"], t["reward"], t["update"],
        )
        if self.tracker is None or epoch <= self.logged_through:
            return
        self.tracker.log_metrics(metrics, step=epoch)
        every = self.cfg.log_images_every
        if every and (epoch % every == 0 or epoch == self.cfg.epochs):
            shown = slice(0, GRID_IMAGES)
            captions = [f"{p} | {r:.3g}" for p, r in zip(traj.prompts[shown], traj.rewards[shown].tolist())]
            self.tracker.log_image_grid(traj.images[shown].float().cpu(), captions, step=epoch)

    def maybe_checkpoint(self, epoch: int) -> None:
        every = self.cfg.checkpoint_every
        if not every or epoch % every or not self.accelerator.is_main_process:
            return
        save_checkpoint(
            self.run_dir, epoch, self.parts.model, self.parts.optimizer, self.state_dict(),
            keep=self.cfg.keep_checkpoints,
        )
