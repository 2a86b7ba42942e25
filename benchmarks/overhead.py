"""How lean is the loop? Epoch seconds by phase, epoch / pure-network time, and PCPO / GRPO.

    python benchmarks/overhead.py                        # the embedded default (tiny_sd, CPU)
    python benchmarks/overhead.py --repeats 8 model=sd15 model.pretrained=/path/to/pipeline hardware=gpu1

Positional arguments are Hydra overrides, exactly as `pcpo-train` takes them, so any diffusers SD
pipeline folder can be measured (`model=sd15 model.pretrained=<folder>`). GRPO and PCPO are built
from the same config (algorithm=grpo / algorithm=pcpo) and run real epochs in alternating order.

Pure network time is clocked inside those same epochs: every forward call of the denoiser, and
every backward from the moment the gradient reaches the denoiser's output until backward returns
(the loss's own backward before that is not counted). The rest of the epoch (sampler arithmetic,
log-ratios, losses, optimizer, VAE, text encoder, reward, Python) is overhead. Measuring both in
the same milliseconds matters: this machine's speed drifts by tens of percent within seconds, so
a separately timed network-only pass would carry that drift into the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir

from pcpo_hydra import build
from pcpo_hydra.config import validate
from pcpo_hydra.config.hydra_setup import config_dir
from pcpo_hydra.loop import Trainer

ALGORITHMS = ("grpo", "pcpo")
PHASES = ("rollout", "reward", "update", "epoch")


@dataclass
class Arm:
    """One algorithm's trainer, its network clock and the seconds measured per epoch."""

    name: str
    trainer: Trainer
    clock: NetworkClock
    epochs: list[dict[str, float]]  # seconds by phase, the epoch, and the network inside it


def build_trainer(overrides: list[str], algorithm: str) -> Trainer:
    """The trainer `pcpo-train` would build, without MLflow or checkpoints."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose("train", [*overrides, f"algorithm={algorithm}", "checkpoint_every=0"]))
    return build.build_trainer(cfg, run_dir=".", track=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NetworkClock:
    """Seconds spent inside the denoiser during real epochs (forwards and backwards)."""

    def __init__(self, trainer: Trainer) -> None:
        self.device = trainer.parts.model.device
        self.seconds = 0.0
        self._start = 0.0
        network = trainer.parts.model.network
        network.register_forward_pre_hook(self._begin)
        network.register_forward_hook(self._end_forward)
        backward = trainer.accelerator.backward

        def clocked_backward(loss: torch.Tensor, **kwargs) -> None:
            backward(loss, **kwargs)
            self._stop()

        trainer.accelerator.backward = clocked_backward

    def _begin(self, *_) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _stop(self) -> None:
        _sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def _end_forward(self, _module, _inputs, output) -> None:
        self._stop()
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:  # the network's backward starts when the gradient reaches its output
            out.register_hook(lambda grad: self._begin())


def measure(arm: Arm) -> None:
    """One real epoch of this arm: seconds by phase, and the network's share of them."""
    arm.clock.seconds = 0.0
    arm.trainer.run_epoch(len(arm.epochs) + 1)
    arm.epochs.append({**arm.trainer.timings, "network": arm.clock.seconds})


def _median(values) -> float:
    return statistics.median(list(values))


def report(arms: dict[str, Arm], device: str, threads: int) -> None:
    grpo, pcpo = arms["grpo"].epochs, arms["pcpo"].epochs
    print(f"\ndevice {device}, torch threads {threads}, {len(grpo)} measured epochs per algorithm (medians)")
    overhead = {name: _median(e["epoch"] - e["network"] for e in a.epochs) for name, a in arms.items()}
    per_net = {name: _median(e["epoch"] / e["network"] for e in a.epochs) for name, a in arms.items()}
    columns = [*PHASES, "network"]
    print(f"{'':6s}" + "".join(f"{c + ' s':>11s}" for c in columns) + f"{'overhead s':>12s}{'epoch/net':>11s}")
    for name, arm in arms.items():
        print(f"{name:6s}" + "".join(f"{_median(e[c] for e in arm.epochs):11.3f}" for c in columns)
              + f"{overhead[name]:12.3f}{per_net[name]:11.3f}")
    raw = [p["epoch"] / g["epoch"] for g, p in zip(grpo, pcpo)]
    # Both do the same network work; only their overheads differ. Adding each one's median
    # overhead to the common median network time removes the machine's drift from the ratio.
    network = _median(e["network"] for e in grpo + pcpo)
    print("\nepoch / pure network time: " + ", ".join(f"{name} {ratio:.3f}" for name, ratio in per_net.items()))
    print(f"PCPO / GRPO epoch time: {(network + overhead['pcpo']) / (network + overhead['grpo']):.3f} "
          f"from overheads on the common network time; {_median(raw):.3f} as the median of "
          f"{len(raw)} neighbouring epoch pairs (quartiles {statistics.quantiles(raw, n=4)[0]:.3f}"
          f"-{statistics.quantiles(raw, n=4)[2]:.3f})")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12, help="measured epochs per algorithm")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured epochs per algorithm first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for pcpo-train")
    args = parser.parse_args(argv)
    trainers = {name: build_trainer(args.overrides, name) for name in ALGORITHMS}
    arms = {name: Arm(name, trainer, NetworkClock(trainer), []) for name, trainer in trainers.items()}
    for arm in arms.values():
        for _ in range(args.warmup):
            measure(arm)
        arm.epochs.clear()
    for repeat in range(args.repeats):
        order = ALGORITHMS if repeat % 2 == 0 else ALGORITHMS[::-1]  # neither always runs first
        for name in order:
            measure(arms[name])
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{a.name} epoch {a.epochs[-1]['epoch']:.2f}s network {a.epochs[-1]['network']:.2f}s"
            for a in arms.values()), flush=True)
    device = str(arms["grpo"].trainer.parts.model.device)
    report(arms, device, torch.get_num_threads())


if __name__ == "__main__":
    main(sys.argv[1:])
