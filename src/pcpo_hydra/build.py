"""Build a run's parts from a validated config and drive the trainer, MLflow run included."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pcpo_hydra.config.registry import schema_for
from pcpo_hydra.checkpoint import (
    CheckpointError, checkpoint_root, intact_checkpoint, load_checkpoint, register_weight_hooks,
)
from pcpo_hydra.callbacks import Callback
from pcpo_hydra.algorithms.base import Algorithm
from pcpo_hydra.algorithms.steps import stored_steps, trained_steps
from pcpo_hydra.evaluation.callback import evaluation_callbacks
from pcpo_hydra.distributed import build_accelerator, in_submitit_job, seed_everything, weight_dtype
from pcpo_hydra.ema import WeightAverage
from pcpo_hydra.loop import Components, Trainer
from pcpo_hydra.weights import ModelLoadError
from pcpo_hydra.preemption import Preempted, StopSignals
from pcpo_hydra.prompts import split_holdout
from pcpo_hydra.tracker import NullTracker
from pcpo_hydra.tracking import flatten_config, git_commit
from pcpo_hydra.samplers.base import instantiate_sampler

log = logging.getLogger(__name__)


def accumulation_steps(cfg: DictConfig) -> int:
    """Backward passes per optimizer step: micro-batches per update x forwards per micro-batch.

    An algorithm whose schema says STEPS_MAJOR (SDPO) makes one forward per micro-batch and step slot,
    with train.num_updates optimizer steps per slot (update.Schedule).
    """
    samples = cfg.rollout.prompts_per_epoch * cfg.rollout.group_size
    micro_batches = samples // cfg.train.batch_size // cfg.train.num_updates
    if getattr(schema_for("algorithm", cfg.algorithm), "STEPS_MAJOR", False):
        return micro_batches
    trained = trained_steps(stored_steps(cfg.sampler), cfg.train.timestep_fraction)
    return micro_batches * math.ceil(trained / cfg.train.steps_per_forward)


def build(node: DictConfig):
    """Instantiate a component; a ModelLoadError reaches the user as itself, not wrapped by Hydra."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, ModelLoadError):
            raise error.__cause__ from None
        raise


def instantiate_algorithm(node: DictConfig, group_size: int) -> Algorithm:
    """Instantiate the algorithm node; an object missing part of the Algorithm protocol fails here, by name."""
    algorithm = instantiate(node, group_size=group_size)
    missing = [name for name in vars(Algorithm)
               if not name.startswith("_") and not callable(getattr(algorithm, name, None))]
    if missing:
        raise TypeError(
            f"algorithm._target_={node._target_} built a {type(algorithm).__name__} without "
            f"{', '.join(missing)}: an algorithm implements pcpo_hydra.algorithms.base.Algorithm"
        )
    return algorithm


def build_components(cfg: DictConfig, accelerator) -> Components:
    """Instantiate model, sampler, reward, algorithm and prompts; prepare what trains and the text cache."""
    model = build(cfg.model)
    model.to(accelerator.device, weight_dtype(cfg.hardware))
    prompts = instantiate(cfg.prompts)
    model.use_text_cache(cfg.text_cache_dir)
    model.prepare_text([prompts[k] for k in range(len(prompts))])
    if cfg.eval.every and cfg.eval.holdout:  # training never draws the held-out prompts; else it draws them all
        prompts, _ = split_holdout(prompts, cfg.eval.holdout)
    algorithm = instantiate_algorithm(cfg.algorithm, cfg.rollout.group_size)
    sampler = algorithm.prepare(model, instantiate_sampler(cfg.sampler, model))
    optimizer = torch.optim.AdamW(  # fused: one kernel for all tensors instead of one per tensor
        model.trainable_parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, fused=True,
    )
    model.network, optimizer = accelerator.prepare(model.network, optimizer)
    ema = cfg.train.ema
    average = None if ema.decay is None else WeightAverage(model.trainable_parameters(), ema.decay, ema.every)
    register_weight_hooks(accelerator, model, average)
    reward = build(cfg.reward)
    return Components(model, sampler, reward, algorithm, prompts, optimizer, average)


def run_tags(choices: dict[str, str], overrides: list[str], job: dict[str, str]) -> dict[str, str]:
    """What a user filters runs by in the MLflow UI; `job` says which sweep job (and SLURM job) this is."""
    tags = {group: str(choices.get(group)) for group in
            ("algorithm", "model", "sampler", "reward", "hardware", "prompts", "experiment")}
    tags["overrides"] = " ".join(overrides) or "(none)"
    tags.update(job)
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def build_trainer(
    cfg: DictConfig, run_dir: Path, track: bool = True, callbacks: Sequence[Callback] = ()
) -> Trainer:
    """Seeded parts, accelerator and trainer; the main process gets the configured tracker if `track`."""
    seed_everything(cfg.seed)
    accelerator = build_accelerator(cfg.hardware, cfg.train, accumulation_steps(cfg))
    parts = build_components(cfg, accelerator)
    tracker = instantiate(cfg.logger) if track and accelerator.is_main_process else NullTracker()
    return Trainer(cfg, parts, accelerator, tracker, run_dir, callbacks=callbacks)


def run(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str], job: dict[str, str],
    callbacks: Sequence[Callback] = (),
) -> float:
    """Train one run in `run_dir` on this rank; `job` tags name the job it is (sweep, SLURM, benchmark).

    A run dir that already holds a checkpoint is continued from it, into the same MLflow run:
    `resume=<dir>` sends a run there, and a requeued SLURM job comes back to its own.
    """
    stop = StopSignals().install()  # before the slow build: a signal then still gets its checkpoint
    trainer = build_trainer(cfg, run_dir, callbacks=[*evaluation_callbacks(cfg, callbacks), *callbacks])
    trainer.stop = stop
    tracker = trainer.tracker
    run_id = resume_from_checkpoint(trainer, run_dir)
    status, stopped = "FAILED", None
    try:
        tracker.start(run_id, flatten_config(OmegaConf.to_container(cfg, resolve=True)),
                      {**run_tags(choices, overrides, job), "run_dir": str(run_dir)})
        trainer.logged_through = tracker.last_logged_step("rollout/reward_mean") or 0
        if run_id is None:
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        else:  # its params keep the first launch's values: say what this launch changed
            tracker.tag_resume(overrides)
        result = trainer.fit()
        final = run_dir / "final_weights"
        save_final_weights(trainer, final)
        tracker.log_artifact(final, "weights")
        status = "FINISHED"
        return result
    except Preempted as preempted:
        status, stopped = "KILLED", preempted
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
        if stopped is None:  # the run's handlers leave with it: a benchmark trains many runs in one process
            stop.uninstall()
    stop.hand_over(stopped, in_submitit_job(), run_dir)  # leaves the process (requeued under submitit)


def resume_from_checkpoint(trainer: Trainer, run_dir: Path) -> str | None:
    """Load the newest intact checkpoint of `run_dir` into `trainer`; return the MLflow run it continues, if any.

    Damaged newer checkpoints are passed over with a warning naming the bad file; a run dir whose
    every checkpoint is damaged is a CheckpointError rather than a silent restart from epoch 0.
    """
    checkpoint, damaged = intact_checkpoint(run_dir)
    for problem in damaged:
        log.warning("passing over a damaged checkpoint: %s", problem)
    if checkpoint is None:
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {checkpoint_root(run_dir)}: {'; '.join(damaged)}")
        return None
    state = load_checkpoint(checkpoint, trainer.accelerator)
    trainer.load_state_dict(state)
    log.info("resumed %s at epoch %d", checkpoint, trainer.epoch)
    return state["mlflow_run_id"]


def save_final_weights(trainer: Trainer, directory: Path) -> None:
    """The trained weights (their EMA with train.ema), written by rank 0; under ZeRO-3 every rank first helps gather them.

    ZeRO-3 and the EMA never meet: validation refuses the pair.
    """
    accelerator, model = trainer.accelerator, trainer.parts.model
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.network.module.parameters()), modifier_rank=None):
            if accelerator.is_main_process:
                model.save_trainable(directory)
    elif accelerator.is_main_process:
        with trainer.ema_weights():
            model.save_trainable(directory)
    accelerator.wait_for_everyone()
