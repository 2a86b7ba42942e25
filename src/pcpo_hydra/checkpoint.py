"""Checkpoints in the run directory: trainable weights, optimizer, and the trainer's own state.

Layout: <run_dir>/checkpoints/epoch_00005/{weights/, optimizer.pt, trainer.pt}. A checkpoint is
written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half-checkpoint that resume would pick up. torch is imported only to save or load, so config
validation can look for a checkpoint without it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

_PREFIX = "epoch_"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "trainer.pt").is_file())
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, epoch: int, model: Any, optimizer: Any, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `epoch` atomically and prune all but the newest `keep`."""
    import torch

    root = checkpoint_root(run_dir)
    final = root / f"{_PREFIX}{epoch:05d}"
    partial = root / f".partial_{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_trainable(partial / "weights")
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(trainer_state, partial / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> dict:
    """Restore weights and optimizer in place; return the trainer state saved beside them."""
    import torch

    model.load_trainable(path / "weights")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
