"""SDPO against GRPO and PCPO on a few-step model: the reward of 1-step and 4-step samples as training goes.

The SDPO paper's comparison (Zhang et al., TPAMI 2026, its reward curves for low-step samples): every
arm fine-tunes the same model from the same seed on the same prompts, images per epoch and training
sampler (DDIM, eta 1, `sampler.num_steps` trailing timesteps); every `--eval-every` epochs the policy
samples held-out prompts with fixed noise, deterministically (DDIM eta 0), at each of `--eval-steps`
step counts, and the training reward scores them. Arms differ only in `algorithm=`; SDPO trains one
step slot at a time as its reference does (train.steps_per_forward=1), so it takes train.num_updates
optimizer steps per slot where GRPO and PCPO take them per epoch; `sdpo_one_slot` trains every step
in one slot, with GRPO's optimizer steps per epoch.

    python benchmarks/sdpo.py --seeds 0 1 2 --epochs 40                     # tiny_sd_turbo, jpeg compressibility
    python benchmarks/sdpo.py --seeds 0 --epochs 2 --eval-every 1 hardware.num_threads=1   # a smoke run

Extra arguments are Hydra overrides applied to every arm (e.g. model=... reward=...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pcpo_hydra import build
from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.evaluation.callback import Evaluation
from pcpo_hydra.loop import Trainer
from pcpo_hydra.samplers.ddim import DDIMSampler
from pcpo_hydra.sampling.guidance import sample_images

EXPERIMENT = "sdpo-benchmark"
ARMS = {
    "grpo": ["algorithm=grpo"],
    "pcpo": ["algorithm=pcpo"],
    "sdpo": ["algorithm=sdpo", "train.steps_per_forward=1"],
    # every step in one slot: as many optimizer steps per epoch as GRPO's, to tell the objective from the schedule
    "sdpo_one_slot": ["algorithm=sdpo", "train.steps_per_forward=${sampler.num_steps}"],
}
BASE = ["model=tiny_sd_turbo", "checkpoint_every=0", "log_images_every=0", "eval=holdout",
        f"logger.experiment_name={EXPERIMENT}"]


@dataclass
class Curve:
    """One run's evaluation rewards by step count, at each evaluated epoch, and its training seconds."""

    arm: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    rewards: dict[str, list[float]] = field(default_factory=dict)  # str(steps) -> mean reward per evaluation
    seconds_per_epoch: float = float("nan")


class FewStepEvaluation(Evaluation):
    """The run's held-out evaluation, sampled at several step counts instead of the training sampler's."""

    def __init__(self, cfg, steps: list[int], curve: Curve) -> None:
        super().__init__(cfg)
        self.steps, self.curve = steps, curve

    def maybe_evaluate(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        if not self.should_evaluate(trainer, epoch):
            return {}
        if not self.prompts:
            self.setup(trainer)
        model, metrics = trainer.parts.model, {}
        model.network.eval()
        for steps in self.steps:
            sampler = DDIMSampler(model.scheduler, steps).deterministic()
            images = sample_images(model, sampler, self.prompts, self.seeds, trainer.cfg.rollout.batch_size)
            scores = self.rewards["reward"].score_parts(images, self.prompts)[0].float()
            mean = scores[torch.isfinite(scores)].mean().item()
            metrics[f"eval/reward_{steps}_steps_mean"] = mean
            self.curve.rewards.setdefault(str(steps), []).append(mean)
        self.curve.epochs.append(epoch)
        return metrics


def train(arm: str, seed: int, args: argparse.Namespace) -> Curve:
    """One real run through `build.run`, evaluated by FewStepEvaluation; its curve."""
    overrides = [*BASE, *ARMS[arm], f"seed={seed}", f"epochs={args.epochs}", f"eval.every={args.eval_every}",
                 *args.overrides]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose("train", overrides))
        choices = compose("train", overrides, return_hydra_config=True).hydra.runtime.choices
    curve = Curve(arm, seed)
    evaluation = FewStepEvaluation(cfg.eval, args.eval_steps, curve)
    started = time.perf_counter()
    tags = {"benchmark": "sdpo", "arm": arm, "seed": str(seed)}
    build.run(cfg, Path(args.out) / "runs" / f"{arm}_seed{seed}", {k: str(v) for k, v in choices.items()},
              overrides, tags, callbacks=[evaluation])
    curve.seconds_per_epoch = (time.perf_counter() - started) / args.epochs
    return curve


def spread(values: list[float]) -> str:
    """mean ± std over seeds (std 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def report(curves: list[Curve], steps: list[int]) -> list[str]:
    """Markdown: per arm, the base and final evaluation reward at each step count, and the gain over seeds."""
    lines = ["| arm | seeds | s/epoch (with evaluations) | "
             + " | ".join(f"{n}-step reward: base -> final (gain)" for n in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for arm in dict.fromkeys(c.arm for c in curves):
        runs = [c for c in curves if c.arm == arm]
        cells = []
        for n in steps:
            base = [c.rewards[str(n)][0] for c in runs]
            final = [c.rewards[str(n)][-1] for c in runs]
            gain = [f - b for f, b in zip(final, base)]
            cells.append(f"{spread(base)} -> {spread(final)} ({spread(gain)})")
        seconds = statistics.fmean(c.seconds_per_epoch for c in runs)
        lines.append(f"| {arm} | {len(runs)} | {seconds:.2f} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[1, 4, 10], help="step counts evaluated")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/sdpo"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm")
    return parser.parse_args(argv)


def main(argv: list[str]) -> list[Curve]:
    args = parse_args(argv)
    curves = [train(arm, seed, args) for seed in args.seeds for arm in args.arms]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps([asdict(c) for c in curves], indent=1))
    print("\n".join(report(curves, args.eval_steps)))
    return curves


if __name__ == "__main__":
    main(sys.argv[1:])
