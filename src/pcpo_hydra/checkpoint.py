"""Checkpoints in the run directory, through Accelerate's state API so ZeRO shards round-trip.

Layout: <run_dir>/checkpoints/epoch_00005/ holds Accelerate's state (optimizer, RNG streams of
every rank; under DeepSpeed the engine's sharded model and optimizer states), `weights/` (the
trained weights only, as the model saves them: LoRA adapters or the whole network) and
`trainer.pt` (epoch, shuffling stream, advantage statistics, MLflow run id). A checkpoint is
written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half-checkpoint that resume would pick up. torch is imported only to save or load, so config
validation can look for a checkpoint without it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pcpo_hydra.writes import written

_PREFIX = "epoch_"
TRAINER_STATE = "trainer.pt"
WEIGHTS = "weights"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / TRAINER_STATE).is_file())
    return found[-1] if found else None


def register_weight_hooks(accelerator: Any, model: Any) -> None:
    """Without DeepSpeed, Accelerate would save the whole network (base included): save the trained weights only.

    Under DeepSpeed the engine saves and loads its own (sharded) states, frozen weights left out.
    """

    def save(models: list, weights: list, output_dir: str) -> None:
        if weights:
            weights.clear()
            if accelerator.is_main_process:
                model.save_trainable(Path(output_dir) / WEIGHTS)

    def load(models: list, input_dir: str) -> None:
        if models:
            models.clear()
            model.load_trainable(Path(input_dir) / WEIGHTS)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _deepspeed_kwargs(accelerator: Any, saving: bool) -> dict[str, Any]:
    if accelerator.state.deepspeed_plugin is None:
        return {}
    return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}


def save_checkpoint(run_dir: Path, epoch: int, accelerator: Any, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `epoch` atomically (every rank takes part) and prune all but the newest `keep`."""
    import torch

    root = checkpoint_root(run_dir)
    final = root / f"{_PREFIX}{epoch:05d}"
    partial = root / f".partial_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with written(partial):  # a full disk: the partial folder goes, the last complete checkpoint stays
        accelerator.save_state(str(partial), **_deepspeed_kwargs(accelerator, saving=True))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(trainer_state, partial / TRAINER_STATE)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: Any) -> dict:
    """Restore weights, optimizer and RNG streams in place; return the trainer state saved beside them."""
    import torch

    accelerator.load_state(str(path), **_deepspeed_kwargs(accelerator, saving=False))
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
