"""`pcpo-train`: compose the config, validate it, build the parts, run the loop.

Everything heavy is imported inside `run`, after validation, so `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pcpo_hydra.checkpoint import latest_checkpoint
from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.config.command_line import checked_command, config_error
from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers
from pcpo_hydra.config.resume import resumed_config
from pcpo_hydra.preemption import interrupted_message, resume_command
from pcpo_hydra.preflight import preflight
from pcpo_hydra.writes import WriteFailed


register_resolvers()  # before @hydra.main composes: conf/train.yaml's run dir uses them


def main() -> None:
    """The `pcpo-train` command."""
    checked_command("pcpo-train", "train", train)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def train(cfg: DictConfig) -> float:
    """Train one run; returns the final mean reward (what a Hydra sweeper optimises)."""
    try:
        cfg = validate(resumed_config(cfg) if cfg.resume is not None else cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        preflight(cfg, run_dir)
    except ConfigError as exc:
        config_error("pcpo-train", exc)
    from pcpo_hydra.run_lock import RunDirBusy, hold_run_dir

    try:
        with hold_run_dir(run_dir):  # before the heavy imports: a second process on this run dir fails at once
            return launch_run(cfg, run_dir)
    except RunDirBusy as exc:
        print(f"pcpo-train: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # a second Ctrl-C; the first stops after the epoch, checkpointed
        print(interrupted_message(run_dir), file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def launch_run(cfg: DictConfig, run_dir: Path) -> float:
    """Launch the run's ranks in `run_dir`; a failure whose message says what to do ends in that line."""
    from pcpo_hydra.build import run
    from pcpo_hydra.checkpoint import CheckpointError
    from pcpo_hydra.distributed import LaunchError, launch
    from pcpo_hydra.weights import ModelLoadError

    hydra_cfg = HydraConfig.get()
    choices = {group: str(option) for group, option in hydra_cfg.runtime.choices.items()}
    job = partial(run, cfg, run_dir, choices, list(hydra_cfg.overrides.task), job_tags(hydra_cfg))
    try:
        return launch(job, cfg.hardware, OmegaConf.to_container(hydra_cfg.job_logging, resolve=True))
    except (ModelLoadError, LaunchError, CheckpointError) as exc:  # a traceback would bury the message
        print(f"pcpo-train: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except WriteFailed as exc:
        print(f"pcpo-train: {exc}; {after_write_failure(run_dir)}", file=sys.stderr)
        raise SystemExit(1) from None


def after_write_failure(run_dir: Path) -> str:
    """What to do once the disk has room again: continue from the last complete checkpoint, if one was written."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return "free space (or raise ulimit -f), then start the run again"
    return (f"free space (or raise ulimit -f), then `{resume_command(run_dir)}` continues from "
            f"{checkpoint.name}, the last complete checkpoint")


def job_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """Which sweep and job number this run is (multirun only), and its SLURM job id when it has one."""
    from hydra.types import RunMode

    tags = {}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        tags["sweep_id"] = str(Path(hydra_cfg.sweep.dir).resolve())
        tags["job_num"] = str(hydra_cfg.job.num)
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        tags["slurm_job_id"] = f"{slurm_job}_{task}" if task else slurm_job
    return tags


if __name__ == "__main__":
    main()
