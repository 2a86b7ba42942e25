"""Hooks the loop calls at named points: code that must look inside a run gets a seam, not a copy of the epoch.

A benchmark's fixed-set evaluation is the caller today (benchmarks/paper_claims.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pcpo_hydra.loop import Trainer


class Callback:
    """Override the hooks you need; the others do nothing. Every rank calls them, in the same order."""

    def maybe_evaluate(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        """Evaluation metrics for `epoch`, logged with that epoch's own; {} when `epoch` is not evaluated.

        Called after each epoch's update, and with epoch 0 (the untrained model, logged at step 0)
        before the first epoch of a run that starts from scratch.
        """
        return {}

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After `epoch` is logged, with all it logged (evaluation included), before its checkpoint."""
