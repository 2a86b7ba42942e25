"""The run's own top-level keys; each group node is checked by the schema its component registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import at_least, checked, interval, positive


@dataclass
class RolloutSchema:
    prompts_per_epoch: int = checked(positive())
    group_size: int = checked(at_least(2))
    batch_size: int = checked(positive())
    drop_flat_groups: bool = MISSING  # needs algorithm.advantage=group (validation's cross-checks)


@dataclass
class EmaSchema:
    """`train.ema`: an exponential moving average of the trained weights (pcpo_hydra.ema)."""

    decay: Optional[float] = checked(interval(0.0, 1.0, low_open=True, high_open=True))  # null: no EMA
    every: int = checked(positive())


@dataclass
class TrainSchema:
    cfg: bool = MISSING
    batch_size: int = checked(positive())
    inner_epochs: int = checked(positive())
    timestep_fraction: float = checked(interval(0.0, 1.0, low_open=True))
    num_updates: int = checked(positive())
    steps_per_forward: int = checked(positive())
    max_grad_norm: float = checked(positive())
    max_nan_steps: int = checked(positive())  # micro-batches in a row with a non-finite loss before the run stops
    ema: EmaSchema = MISSING


@dataclass
class OptimSchema:
    lr: float = checked(positive())
    weight_decay: float = checked(at_least(0.0))
    betas: list[float] = MISSING
    eps: float = checked(positive())


@dataclass
class RunSchema:
    """Top-level keys; the groups are checked by their own schemas (GROUP_SCHEMAS)."""

    seed: int = checked(interval(0, 2**32 - 1))  # numpy's seeding takes no negative, nothing from 2**32
    epochs: int = checked(positive())
    resume: Optional[str] = MISSING
    run_name: Optional[str] = MISSING
    checkpoint_every: int = checked(at_least(0))
    keep_checkpoints: int = checked(positive())
    log_images_every: int = checked(at_least(0))
    text_cache_dir: Optional[str] = MISSING
    rollout: RolloutSchema = MISSING
    train: TrainSchema = MISSING
    optim: OptimSchema = MISSING
    # Group nodes: typed here as Any, then checked against the schema their `_target_` names.
    model: Any = MISSING
    sampler: Any = MISSING
    reward: Any = MISSING
    algorithm: Any = MISSING
    hardware: Any = MISSING
    prompts: Any = MISSING
    logger: Any = MISSING
    eval: Any = MISSING
