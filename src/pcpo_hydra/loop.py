"""The one generic loop: rollout -> reward -> advantage -> update -> log -> checkpoint, per epoch."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pcpo_hydra.algorithms.advantages import flat_groups
from pcpo_hydra.algorithms.base import Algorithm, initial_noise_group, score_rollouts
from pcpo_hydra.callbacks import Callback
from pcpo_hydra.checkpoint import save_checkpoint
from pcpo_hydra.ema import AveragingOptimizer, WeightAverage
from pcpo_hydra.preemption import Preempted, StopSignals
from pcpo_hydra.rank_layout import RankLayout
from pcpo_hydra.rewards.base import latest_answers
from pcpo_hydra.rollout import Trajectories, sample_trajectories
from pcpo_hydra.samplers.window import SDEWindow
from pcpo_hydra.tracker import Tracker

log = logging.getLogger(__name__)

GRID_IMAGES = 16  # samples shown in a logged grid


@dataclass
class Components:
    """The parts a run is made of; the loop meets them only through their small interfaces."""

    model: Any
    sampler: Any        # the sampler algorithm.prepare returned (PCPO's variance mode changes its stds);
                        # an epoch rolls out and updates with its SDE window's copy (Trainer.epoch_sampler)
    reward: Any
    algorithm: Algorithm
    prompts: Any
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None = None  # the EMA of the trained weights (train.ema), None without one


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


def group_diversity(images: Tensor, group_size: int) -> float:
    """Mean pairwise RMS pixel distance between the images of one prompt's group (0: all the same).

    A policy collapsing onto one image per prompt drives it to 0, whatever the reward does.
    """
    if group_size < 2:
        return float("nan")
    x = images.float().flatten(1)
    x = x.reshape(-1, group_size, x.shape[1])
    distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[2] ** 0.5
    return (distances.sum((1, 2)) / (group_size * (group_size - 1))).mean().item()


class Trainer:
    """Runs epochs and owns everything a resumed run must restore (epoch, RNG streams).

    With several ranks, every rank draws the same global prompt list and samples its own share
    of whole prompt groups (`layout`); rewards are gathered before advantages, so group and
    per-prompt statistics are those of the whole epoch, and the statistics logged are global.
    `callbacks` evaluate and watch the run at the points named in callbacks.Callback.
    """

    def __init__(
        self, cfg: DictConfig, parts: Components, accelerator: Accelerator, tracker: Tracker, run_dir: Path,
        stop: StopSignals | None = None, callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg, self.parts, self.accelerator, self.tracker = cfg, parts, accelerator, tracker
        self.run_dir = Path(run_dir)
        self.stop = stop or StopSignals()
        self.callbacks = list(callbacks)
        rollout = cfg.rollout
        self.layout = RankLayout(accelerator.process_index, accelerator.num_processes, rollout.prompts_per_epoch,
                                 rollout.group_size, rollout.batch_size, cfg.seed, accelerator.device)
        self.epoch = 0              # epochs completed
        self.logged_through = 0     # epochs already in the tracker (a resumed run skips them)
        # Separate streams: the prompt draws stay identical on every rank whatever each rank's
        # update consumes for its own shuffling.
        self.prompt_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 2)
        self.timings: dict[str, float] = {}
        self.window = SDEWindow.from_config(cfg.get("sampler"), cfg.seed)
        self.answers: list[tuple[str, str, float]] = []  # a text-reading reward's answers of this epoch

    # ------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "prompt_generator": self.prompt_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "algorithm": self.parts.algorithm.state_dict(),
            "mlflow_run_id": self.tracker.run_id,
        }
        if self.parts.average is not None:
            state["ema"] = self.parts.average.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.prompt_generator.set_state(state["prompt_generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        # Checkpoints from before pluggable algorithms hold the clipped method's advantage state
        # under "advantages"; that is the whole of its state_dict, so it loads as it is.
        self.parts.algorithm.load_state_dict(state["algorithm"] if "algorithm" in state else state["advantages"])
        if self.parts.average is not None:  # a resume keeps train.ema, so the checkpoint has it
            self.parts.average.load_state_dict(state["ema"])

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA of the trained weights in the network inside the block (train.ema; as they are without one).

        What evaluation samples and the saved weights hold; training goes on from the trained weights.
        """
        with nullcontext() if self.parts.average is None else self.parts.average.swapped_in():
            yield

    # ------------------------------------------------------------------------------- phases

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings[phase] = time.perf_counter() - start

    def epoch_sampler(self, epoch: int) -> Any:
        """The sampler `epoch` rolls out and updates with: the prepared one, or its SDE window's copy.

        The window is a function of the seed and the epoch (samplers/window.py), so a resumed run
        gets the windows an uninterrupted one would.
        """
        if self.window is None:
            return self.parts.sampler
        return self.parts.sampler.windowed(self.window.start(epoch), self.window.size)

    def rollout(self, epoch: int, prompts: list[str], sampler: Any) -> Trajectories:
        with self.timed("rollout"), self.parts.model.guided(self.cfg.train.cfg):
            self.parts.model.network.eval()
            return sample_trajectories(
                self.parts.model, sampler, prompts[self.layout.rows],
                self.cfg.rollout.batch_size, self.layout.noise_generators(epoch),
                same_noise=initial_noise_group(self.parts.algorithm),
            )

    def gather(self, values: Tensor) -> Tensor:
        """Every rank's values, in rank order (= the epoch's global sample order)."""
        return self.accelerator.gather(values.contiguous()) if self.layout.world > 1 else values

    def score(self, traj: Trajectories, prompts: list[str], sampler: Any) -> Tensor:
        """Score this rank's rollouts, set its advantages from the whole epoch's rewards; return all final rewards.

        The reward scores the final images, or the algorithm scores the rollouts itself
        (`score_rollouts`: SDPO's rewards at every step, [n, K], whose last column is the final reward).
        With `rollout.drop_flat_groups` the samples of groups with equal rewards are marked not to
        train (`traj.kept`); every rank sees all rewards, so all agree on which ones without a collective.
        """
        with self.timed("reward"):
            rewards, traj.extras["reward_parts"] = score_rollouts(
                self.parts.algorithm, traj, self.parts.model, sampler, self.parts.reward, self.cfg.rollout.batch_size
            )
            self.answers = latest_answers(self.parts.reward)  # before an evaluation calls the reward again
            rewards = rewards.to(device=traj.latents.device, dtype=torch.float32)
            if rewards.dim() == 2:
                traj.extras["step_rewards"] = rewards
            traj.rewards = rewards if rewards.dim() == 1 else rewards[:, -1]
            everyone = self.gather(rewards)
            advantages = self.parts.algorithm.advantages(prompts, everyone)
            traj.advantages = advantages.to(traj.rewards.device)[self.layout.rows]
            final = everyone if everyone.dim() == 1 else everyone[:, -1]
            if self.cfg.rollout.drop_flat_groups:
                flat = flat_groups(final, self.cfg.rollout.group_size)
                traj.kept = ~flat.repeat_interleave(self.cfg.rollout.group_size)[self.layout.rows]
            return final

    def update(self, traj: Trajectories, sampler: Any) -> dict[str, float]:
        with self.timed("update"), self.parts.model.guided(self.cfg.train.cfg):
            self.parts.model.network.train()
            optimizer, average = self.parts.optimizer, self.parts.average
            if average is not None:
                optimizer = AveragingOptimizer(optimizer, average, self.accelerator)
            return self.parts.algorithm.update(
                traj, self.parts.model, sampler,
                optimizer, self.accelerator, self.cfg.train, self.shuffle_generator,
            )

    # ------------------------------------------------------------------------------- loop

    def run_epoch(self, epoch: int) -> tuple[Trajectories, Tensor, dict[str, float]]:
        """One rollout -> reward -> advantage -> update pass, timed by phase and in total."""
        start = time.perf_counter()
        prompts = self.layout.draw_prompts(self.parts.prompts, self.prompt_generator)
        sampler = self.epoch_sampler(epoch)
        traj = self.rollout(epoch, prompts, sampler)
        rewards = self.score(traj, prompts, sampler)
        train_stats = self.update(traj, sampler)
        self.timings["epoch"] = time.perf_counter() - start
        return traj, rewards, train_stats

    def fit(self) -> float:
        """Train from the epoch after the last completed one to `cfg.epochs`; return the last reward mean."""
        metrics: dict[str, float] = {}
        if self.epoch == 0 and (untrained := self.evaluate(0)):
            self.tracker.log_metrics(untrained, step=0)
        epochs = range(self.epoch + 1, self.cfg.epochs + 1)
        bar = tqdm(epochs, desc="epochs", disable=not self.accelerator.is_main_process)
        with logging_redirect_tqdm():
            for epoch in bar:
                traj, rewards, train_stats = self.run_epoch(epoch)
                metrics = {**self.epoch_metrics(traj, rewards, train_stats), **self.evaluate(epoch)}
                self.log_epoch(epoch, metrics, traj)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, epoch, metrics)
                self.epoch = epoch
                self.maybe_checkpoint(epoch)
                self.maybe_stop(epoch)
        return metrics.get("rollout/reward_mean", float("nan"))

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Every callback's evaluation metrics for `epoch` (none on most epochs)."""
        metrics: dict[str, float] = {}
        for callback in self.callbacks:
            metrics.update(callback.maybe_evaluate(self, epoch))
        return metrics

    def maybe_stop(self, epoch: int) -> None:
        """After a stop signal reached any rank: checkpoint this epoch (all ranks) and raise Preempted."""
        signum = self.stop.agreed(self.accelerator)
        if signum is None or epoch == self.cfg.epochs:
            return
        if not (self.cfg.checkpoint_every and epoch % self.cfg.checkpoint_every == 0):
            self.save(epoch)
        raise Preempted(signum, epoch)

    # ------------------------------------------------------------------------------- outputs

    def epoch_metrics(self, traj: Trajectories, rewards: Tensor, train_stats: dict[str, float]) -> dict[str, float]:
        """The epoch's statistics over all ranks: rewards and advantages gathered, training means averaged."""
        adv = self.gather(traj.advantages)
        metrics = {
            **reward_stats("rollout/reward", rewards),
            "rollout/advantage_mean": adv.mean().item(),
            "rollout/advantage_std": adv.std(unbiased=False).item(),
            "rollout/advantage_abs_max": adv.abs().max().item(),
            # logged whether or not they are dropped: how much of the epoch the group baseline wastes
            "rollout/flat_groups": float(flat_groups(rewards, self.cfg.rollout.group_size).sum()),
            "train/lr": self.parts.optimizer.param_groups[0]["lr"],
            **self.mean_over_ranks(
                {**train_stats, "rollout/group_diversity": group_diversity(traj.images, self.cfg.rollout.group_size)}
            ),
        }
        if self.window is not None:
            metrics["rollout/sde_window_start"] = float(traj.first_step)
        if "step_rewards" in traj.extras:  # the mean reward of each step's clean-sample prediction (SDPO)
            dense = self.gather(traj.extras["step_rewards"])
            means = dense.nan_to_num(0.0, 0.0, 0.0).sum(0) / torch.isfinite(dense).sum(0).clamp(min=1)
            metrics.update({f"rollout/step_{k + 1}_reward_mean": m for k, m in enumerate(means.tolist())})
        for name, values in traj.extras["reward_parts"].items():
            metrics.update(reward_stats(f"reward/{name}", self.gather(values.to(adv.device).float())))
        for name, count in self.parts.model.text_cache.take_counts().items():
            metrics[f"text_cache/{name}"] = count
        metrics.update({f"time/{phase}_s": seconds for phase, seconds in self.timings.items()})
        metrics["perf/images_per_s"] = len(rewards) / self.timings["epoch"]
        return metrics

    def mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the ranks (the same keys on every rank, in the same order)."""
        if self.layout.world == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], device=self.accelerator.device, dtype=torch.float64)
        return dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist()))

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
        if epoch <= self.logged_through:
            return
        # The grid before the metrics: a resume re-logs the epochs after the last logged reward, so a
        # kill between the two then repeats a grid rather than losing it for good.
        every = self.cfg.log_images_every
        if every and (epoch % every == 0 or epoch == self.cfg.epochs):
            shown = slice(0, GRID_IMAGES)
            captions = [f"{p} | {r:.3g}" for p, r in zip(traj.prompts[shown], traj.rewards[shown].tolist())]
            self.tracker.log_image_grid(traj.images[shown].float().cpu(), captions, step=epoch)
        if self.answers:  # what a text-reading reward read in the epoch's images, as an MLflow table file
            table = {"columns": ["prompt", "answer", "score"], "data": [list(row) for row in self.answers[:GRID_IMAGES]]}
            self.tracker.log_text(json.dumps(table, indent=1), f"reward_answers/epoch_{epoch:05d}.json")
        self.tracker.log_metrics(metrics, step=epoch)

    def maybe_checkpoint(self, epoch: int) -> None:
        every = self.cfg.checkpoint_every
        if every and epoch % every == 0:
            self.save(epoch)

    def save(self, epoch: int) -> None:
        """Checkpoint `epoch`; every rank takes part (ZeRO shards are saved by their owners)."""
        save_checkpoint(self.run_dir, epoch, self.accelerator, self.state_dict(), keep=self.cfg.keep_checkpoints)
