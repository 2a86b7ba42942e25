"""What an epoch costs under each speed setting: seconds per phase and network images, against the full-SDE epoch.

    python benchmarks/epoch_cost.py                                # the embedded default (tiny_sd, CPU), 6 epochs
    python benchmarks/epoch_cost.py model=tiny_sd3                 # a flow model (Flow-GRPO's SDE)
    python benchmarks/epoch_cost.py --settings full,nocfg --epochs 10 model=sd15 model.pretrained=/path hardware=gpu1

Settings (SETTINGS): the full-SDE epoch with classifier-free guidance; `nocfg` (train.cfg=false);
`window` (noise and training on a random window of 3 steps, the ODE elsewhere); `window_nocfg`
(both). Positional arguments are Hydra overrides for all of them, as `pcpo-train` takes them.

Every trainer is built from the same config but for its setting, and they run their epochs in
rotating order in this one process, so drift in the machine's speed reaches all alike; the first
epoch of each (warm-up) is left out. The figures are the phases' own timers, the `time/rollout_s`
and `time/update_s` a run logs, and the images each phase puts through the network per epoch.
"""

from __future__ import annotations

import argparse
import statistics

from hydra import compose, initialize_config_dir

from pcpo_hydra import build
from pcpo_hydra.algorithms.steps import network_images_per_epoch
from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.loop import Trainer

PHASES = ("rollout", "update", "epoch")
WINDOW = ["sampler.sde_window.size=3", "sampler.sde_window.placement=random"]
SETTINGS = {
    "full": [],
    "nocfg": ["train.cfg=false"],
    "window": WINDOW,
    "window_nocfg": [*WINDOW, "train.cfg=false"],
}


def build_trainer(overrides: list[str]) -> Trainer:
    """The trainer `pcpo-train` would build, without MLflow or checkpoints."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose("train", [*overrides, "checkpoint_every=0"]))
    return build.build_trainer(cfg, run_dir=".", track=False)


def measure(overrides: list[str], settings: list[str], epochs: int) -> dict[str, dict[str, float]]:
    """Per setting: median seconds of each phase over epochs 2..`epochs`, and its network images per epoch."""
    trainers = {name: build_trainer([*overrides, *SETTINGS[name]]) for name in settings}
    seconds: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in trainers}
    for epoch in range(1, epochs + 1):
        turn = epoch % len(settings)
        for name in settings[turn:] + settings[:turn]:
            trainers[name].run_epoch(epoch)
            if epoch > 1:
                for phase in PHASES:
                    seconds[name][phase].append(trainers[name].timings[phase])
    return {name: {**{phase: statistics.median(values) for phase, values in phases.items()},
                   **{f"{phase}_images": float(n) for phase, n in network_images_per_epoch(trainers[name].cfg).items()}}
            for name, phases in seconds.items()}


def report(medians: dict[str, dict[str, float]], epochs: int) -> list[str]:
    """A markdown table: each setting's phases, network images, and its epoch's share of the first setting's."""
    base = next(iter(medians))
    lines = [f"median seconds over epochs 2..{epochs} (settings alternating in one process); "
             f"network images per epoch; ratio: epoch seconds / {base}'s", "",
             "| setting | rollout s | update s | epoch s | rollout images | update images | epoch ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, m in medians.items():
        lines.append(f"| {name} | {m['rollout']:.3f} | {m['update']:.3f} | {m['epoch']:.3f} | "
                     f"{m['rollout_images']:.0f} | {m['update_images']:.0f} | {m['epoch'] / medians[base]['epoch']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per setting, the first a warm-up (>= 2)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}; "
                        "the first is the baseline of the ratio")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as pcpo-train takes them")
    args = parser.parse_args()
    settings = args.settings.split(",")
    if args.epochs < 2:
        parser.error(f"--epochs={args.epochs}: needs at least 2 (the first is a warm-up)")
    if unknown := [name for name in settings if name not in SETTINGS]:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    print("\n".join(report(measure(args.overrides, settings, args.epochs), args.epochs)))


if __name__ == "__main__":
    main()
