"""Images per second of pcpo-sample on the tiny models (CPU): the base model alone and a one-policy IRG mix.

    python benchmarks/sampling.py --images 32 --repeats 3 --threads 1

Each figure times `sample_images` (text encoding, every step's network calls, VAE decode) on the
config pcpo-sample composes (conf/sample.yaml, the model's own recipe: 10 steps, guidance on),
after one warm-up batch; the model build and process start are timed apart. An IRG mix with one
policy of weight != 1 evaluates the base and the policy every step, so it costs about twice the
network calls. The policy is the base's own weights saved with save_trainable (the speed does not
depend on their values).

Two figures per row: wall-clock images/s (best repeat), and images per CPU-second of this
process (`time.process_time`, best repeat), which a machine shared with other jobs distorts far
less; on one thread and an idle machine the two agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers
from pcpo_hydra.sampling.config import check_config
from pcpo_hydra.sampling.guidance import sample_images
from pcpo_hydra.sampling.run import build_guided

MODELS = ("tiny_sd", "tiny_sd3", "tiny_flux")


def images_per_second(
    model_option: str, irg: bool, images: int, batch_size: int, repeats: int, threads: int
) -> tuple[float, float, float]:
    """(best images/s, best images per CPU-second, over `repeats`; seconds to build the model and load the policy)."""
    with tempfile.TemporaryDirectory() as folder, initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        overrides = [f"model={model_option}", f"batch_size={batch_size}", f"out={folder}/out",
                     f"hardware.num_threads={threads}"]
        cfg = check_config(compose("sample", overrides=overrides), overrides)
        folders = {}
        if irg:
            base, _, _ = build_guided(cfg, {})
            base.save_trainable(Path(folder) / "policy")
            folders = {"aes": Path(folder) / "policy"}
            cfg = check_config(compose("sample", overrides=[*overrides, f"irg.policies={{aes:{folders['aes']}}}",
                                                            "irg.weights={aes:1.5}"]), overrides)
        started = time.perf_counter()
        model, sampler, guided = build_guided(cfg, folders)
        built = time.perf_counter() - started
        prompts = [f"a photo number {k}" for k in range(images)]
        seeds = list(range(images))
        sample_images(model, sampler, prompts[:batch_size], seeds[:batch_size], batch_size, predict=guided.predict)
        wall, cpu = float("inf"), float("inf")
        for _ in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            sample_images(model, sampler, prompts, seeds, batch_size, predict=guided.predict)
            wall = min(wall, time.perf_counter() - started)
            cpu = min(cpu, time.process_time() - started_cpu)
        return images / wall, images / cpu, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (hardware.num_threads)")
    args = parser.parse_args()
    register_resolvers()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.images} images, "
          f"batch {args.batch_size}, best of {args.repeats}")
    print("| model | mix | images/s (wall) | images per CPU-second | build + load (s) |")
    print("|---|---|---|---|---|")
    for option in MODELS:
        for irg in (False, True):
            rate, per_cpu, built = images_per_second(option, irg, args.images, args.batch_size, args.repeats,
                                                     args.threads)
            print(f"| {option} | {'base + 1 IRG policy' if irg else 'base'} | {rate:.1f} | {per_cpu:.1f} | "
                  f"{built:.2f} |", flush=True)


if __name__ == "__main__":
    main()
