"""Checkpoints in the run directory, through Accelerate's state API so ZeRO shards round-trip.

Layout: <run_dir>/checkpoints/epoch_00005/ holds Accelerate's state (optimizer, RNG streams of
every rank; under DeepSpeed the engine's sharded model and optimizer states), `weights/` (the
trained weights only, as the model saves them: LoRA adapters or the whole network; with
`train.ema` their average, the trained ones in `trained_weights/`) and `trainer.pt` (epoch,
shuffling stream, advantage statistics, the EMA's state, MLflow run id). A checkpoint is
written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half-checkpoint that resume would pick up. `manifest.json`, written last, records every file's
size: a checkpoint damaged later (a truncated copy, a disk that filled) is found before loading
and passed over for the newest intact one. torch is imported only to save or load, so config
validation can look for a checkpoint without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pcpo_hydra.writes import written

_PREFIX = "epoch_"
TRAINER_STATE = "trainer.pt"
WEIGHTS = "weights"
TRAINED_WEIGHTS = "trained_weights"  # with train.ema: the raw trained weights, beside their average in weights/
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No checkpoint of a run that has some can be loaded; the message names the damaged file."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def saved_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Every checkpoint folder of a run by epoch, oldest first, intact or not (see `damage`).

    A folder counts when it has a manifest or, saved before manifests existed, its trainer state.
    """
    found = {}
    for path in checkpoint_root(run_dir).glob(f"{_PREFIX}*"):
        epoch = path.name.removeprefix(_PREFIX)
        if epoch.isdigit() and ((path / TRAINER_STATE).is_file() or (path / MANIFEST).is_file()):
            found[int(epoch)] = path
    return dict(sorted(found.items()))


def intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint whose files match its manifest (or None), and what is wrong with newer ones.

    A checkpoint saved before manifests existed counts as intact when its trainer state is there.
    """
    damaged = []
    for checkpoint in reversed(saved_checkpoints(run_dir).values()):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append(problem)
    return None, damaged


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run, or None."""
    return intact_checkpoint(run_dir)[0]


def _file_sizes(checkpoint: Path) -> dict[str, int]:
    return {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*"))
            if f.is_file() and f.name != MANIFEST}


def damage(checkpoint: Path) -> str | None:
    """None when every file of the manifest is there with its saved size, else the first that is not."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return None
    try:
        sizes = json.loads(manifest.read_text())
    except ValueError:
        return f"{manifest} is not valid JSON"
    for name, size in sizes.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when saved"
    return None


def register_weight_hooks(accelerator: Any, model: Any, average: Any = None) -> None:
    """Without DeepSpeed, Accelerate would save the whole network (base included): save the trained weights only.

    With an EMA (`average`, a pcpo_hydra.ema.WeightAverage), `weights/` holds the averaged weights,
    what pcpo-sample and matched-reward choice load, and TRAINED_WEIGHTS the trained ones a resume
    continues from. Under DeepSpeed the engine saves and loads its own (sharded) states, frozen
    weights left out, and the average travels in the trainer state only.
    """
    resumed_from = WEIGHTS if average is None else TRAINED_WEIGHTS

    def save(models: list, weights: list, output_dir: str) -> None:
        if weights:
            weights.clear()
            if accelerator.is_main_process:
                model.save_trainable(Path(output_dir) / resumed_from)
                if average is not None:
                    with average.swapped_in():
                        model.save_trainable(Path(output_dir) / WEIGHTS)

    def load(models: list, input_dir: str) -> None:
        if models:
            models.clear()
            model.load_trainable(Path(input_dir) / resumed_from)

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
            (partial / MANIFEST).write_text(json.dumps(_file_sizes(partial), indent=1))  # written last
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: Any) -> dict:
    """Restore weights, optimizer and RNG streams in place; return the trainer state saved beside them.

    A file that passed its manifest's size check but still does not load (damaged in place) is a
    CheckpointError naming the checkpoint, not a traceback from deep inside torch.
    """
    import torch

    try:
        accelerator.load_state(str(path), **_deepspeed_kwargs(accelerator, saving=False))
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    except Exception as error:
        reason = (str(error) or "no message").splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} does not load ({type(error).__name__}: {reason}); "
            f"delete it to resume from an older one in {path.parent}"
        ) from error
