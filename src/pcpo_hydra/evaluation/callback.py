"""The evaluation callback: the policy samples a fixed held-out set and is scored, through the Trainer's seam."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from pcpo_hydra.callbacks import Callback
from pcpo_hydra.evaluation.matching import EVAL_HISTORY
from pcpo_hydra.loop import GRID_IMAGES, Trainer, reward_stats
from pcpo_hydra.prompts import split_holdout
from pcpo_hydra.sampling.guidance import sample_images
from pcpo_hydra.writes import written
from pcpo_hydra.samplers.base import instantiate_sampler

log = logging.getLogger(__name__)

BASE_IMAGES = "eval_base_images.pt"  # in the run dir: what a resumed run measures drift from


def drift(images: Tensor, base: Tensor) -> float:
    """Mean over images of the RMS pixel distance to the base model's image for the same prompt and noise."""
    return ((images.float() - base.float()) ** 2).flatten(1).mean(1).sqrt().mean().item()


def evaluation_callbacks(cfg: DictConfig, given: Sequence[Callback] = ()) -> list[Callback]:
    """The run's evaluation when `eval.every` asks for one, unless `given` brings its own (a benchmark's subclass)."""
    if not cfg.eval.every or any(isinstance(callback, Evaluation) for callback in given):
        return []
    return [Evaluation(cfg.eval)]


class Evaluation(Callback):
    """`eval.every` epochs apart, at the last epoch and at epoch 0 (the base model): sample, score, log.

    The set is `eval.prompts`, or `eval.holdout` prompts carved off the training set (build_components
    keeps them out of the training draws), each `eval.group_size` times; image j of a prompt has seed
    `eval.seed + j`, so two evaluations differ only by the policy, and `pcpo-sample` with those seeds
    draws the same images from a checkpoint. The sampler runs deterministically (`eval.deterministic`).
    Drift is measured from the base model's images, sampled at epoch 0 and saved in the run dir; a
    resumed run loads them from there. Rank 0 appends each evaluation to `eval_history.jsonl` in the
    run dir, which matched-reward checkpoint choice reads (`evaluation.matching`).

    Every rank samples the whole set with the same calls (so ZeRO-3's parameter gathers line up)
    and no collective; rank 0 scores, and its tracker logs the grid (the others hold a NullTracker).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.prompts: list[str] = []
        self.seeds: list[int] = []
        self.sampler = None
        self.rewards: dict[str, object] = {}
        self.base: Tensor | None = None

    def should_evaluate(self, trainer: Trainer, epoch: int) -> bool:
        return epoch == 0 or epoch % self.cfg.every == 0 or epoch == trainer.cfg.epochs

    def maybe_evaluate(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        if not self.should_evaluate(trainer, epoch):
            return {}
        if not self.prompts:
            self.setup(trainer)
        images = self.sample(trainer)
        if epoch == 0:
            self.base = images
            if trainer.accelerator.is_main_process:
                trainer.run_dir.mkdir(parents=True, exist_ok=True)  # before the first checkpoint makes it
                torch.save(images.cpu(), trainer.run_dir / BASE_IMAGES)
        if not trainer.accelerator.is_main_process:
            return {}
        metrics = self.measure(trainer, epoch, images)
        history = trainer.run_dir / EVAL_HISTORY
        history.parent.mkdir(parents=True, exist_ok=True)
        with written(history, remove=False), open(history, "a") as lines:  # a resumed run appends; the last line of an epoch wins
            lines.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        return metrics

    def setup(self, trainer: Trainer) -> None:
        """The held-out prompts, the sampler, the rewards, and (when resuming) the base model's images."""
        if self.cfg.prompts is None:
            _, evaluated = split_holdout(instantiate(trainer.cfg.prompts), self.cfg.holdout)
        else:
            evaluated = instantiate(self.cfg.prompts)
        self.prompts = [p for p in evaluated.prompts for _ in range(self.cfg.group_size)]
        self.seeds = [self.cfg.seed + j for _ in evaluated.prompts for j in range(self.cfg.group_size)]
        model = trainer.parts.model
        sampler = (trainer.parts.sampler if self.cfg.sampler is None
                   else instantiate_sampler(self.cfg.sampler, model))
        self.sampler = sampler.deterministic() if self.cfg.deterministic else sampler
        self.rewards = {"reward": trainer.parts.reward,  # the training reward's own object, not a second copy
                        **{name: instantiate(node, _convert_="all") for name, node in self.cfg.rewards.items()}}
        base_file = trainer.run_dir / BASE_IMAGES
        if trainer.epoch > 0:
            if base_file.is_file():
                self.base = torch.load(base_file)
            else:
                log.warning("no %s in %s: eval/drift is NaN for this run", BASE_IMAGES, trainer.run_dir)

    def sample(self, trainer: Trainer) -> Tensor:
        """The evaluation images: the same prompts and seeds each time, so only the policy changes them.

        With train.ema the policy evaluated is the EMA of the trained weights, as the saved weights are.
        """
        trainer.parts.model.network.eval()
        with trainer.ema_weights():
            return sample_images(trainer.parts.model, self.sampler, self.prompts, self.seeds,
                                 trainer.cfg.rollout.batch_size)

    def measure(self, trainer: Trainer, epoch: int, images: Tensor) -> dict[str, float]:
        """eval/<reward>_mean and _std, eval/drift; the captioned grid for epochs the tracker lacks."""
        metrics: dict[str, float] = {}
        first: Tensor | None = None
        for name, reward in self.rewards.items():
            scores = reward.score_parts(images, self.prompts)[0].float().cpu()
            first = scores if first is None else first
            stats = reward_stats(f"eval/{name}", scores)
            metrics.update({key: stats[key] for key in (f"eval/{name}_mean", f"eval/{name}_std")})
        metrics["eval/drift"] = drift(images, self.base) if self.base is not None else float("nan")
        if epoch == 0 or epoch > trainer.logged_through:
            shown = slice(0, GRID_IMAGES)
            captions = [f"{p} | {r:.3g}" for p, r in zip(self.prompts[shown], first[shown].tolist())]
            trainer.tracker.log_image_grid(images[shown].float().cpu(), captions, step=epoch, key="eval")
        return metrics
