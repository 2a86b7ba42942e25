"""What training without classifier-free guidance saves: seconds per epoch with train.cfg=true and =false.

    python benchmarks/train_cfg.py                          # the embedded default (tiny_sd, CPU), 6 epochs
    python benchmarks/train_cfg.py --epochs 10 model=sd15 model.pretrained=/path/to/pipeline hardware=gpu1

Positional arguments are Hydra overrides, as `pcpo-train` takes them. Both trainers are built from
the same config but for train.cfg and run their epochs in alternating order in this one process,
so drift in the machine's speed reaches both alike; the first epoch of each (warm-up) is left out.
The figures are the phases' own timers, the `time/rollout_s` and `time/update_s` a run logs.
"""

from __future__ import annotations

import argparse
import statistics

from hydra import compose, initialize_config_dir

from pcpo_hydra import build
from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.loop import Trainer

PHASES = ("rollout", "update", "epoch")


def build_trainer(overrides: list[str], cfg_on: bool) -> Trainer:
    """The trainer `pcpo-train` would build, without MLflow or checkpoints."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose("train", [*overrides, f"train.cfg={str(cfg_on).lower()}", "checkpoint_every=0"]))
    return build.build_trainer(cfg, run_dir=".", track=False)


def measure(overrides: list[str], epochs: int) -> dict[bool, dict[str, float]]:
    """Median seconds of each phase over epochs 2..`epochs`, per train.cfg value."""
    trainers = {on: build_trainer(overrides, on) for on in (True, False)}
    seconds: dict[bool, dict[str, list[float]]] = {on: {phase: [] for phase in PHASES} for on in trainers}
    for epoch in range(1, epochs + 1):
        for on in ((True, False) if epoch % 2 else (False, True)):
            trainers[on].run_epoch(epoch)
            if epoch > 1:
                for phase in PHASES:
                    seconds[on][phase].append(trainers[on].timings[phase])
    return {on: {phase: statistics.median(values) for phase, values in phases.items()} for on, phases in seconds.items()}


def report(medians: dict[bool, dict[str, float]], epochs: int) -> None:
    print(f"median seconds over epochs 2..{epochs} (train.cfg=true and =false alternating in one process)")
    print(f"{'phase':<10}{'cfg=true':>10}{'cfg=false':>11}{'false/true':>12}")
    for phase in PHASES:
        on, off = medians[True][phase], medians[False][phase]
        print(f"{phase:<10}{on:>10.3f}{off:>11.3f}{off / on:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per arm, the first a warm-up (>= 2)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as pcpo-train takes them")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs={args.epochs}: needs at least 2 (the first is a warm-up)")
    report(measure(args.overrides, args.epochs), args.epochs)


if __name__ == "__main__":
    main()
