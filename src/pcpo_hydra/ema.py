"""An exponential moving average (EMA) of the trained weights (`train.ema`), as Flow-GRPO and DanceGRPO keep.

Training steps the raw weights; evaluation, the checkpoints' `weights/` and `final_weights/` use the
average. The averaging itself is diffusers' `EMAModel` (diffusers.training_utils), which works on a
list of parameters: torch's `AveragedModel` deep-copies the whole module, which under LoRA would be
a second copy of the frozen base network as well as of the adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn


class WeightAverage:
    """The EMA of `params` (the model's trainable parameters: LoRA adapters or the whole network).

    The shadow weights are float32, on the parameters' device. Every `every`-th optimizer step
    (`optimizer_stepped`) updates them, shadow <- d_k shadow + (1 - d_k) w, at the k-th update with

        d_1 = 0,   d_k = min(decay, k / (k + 9))  for k >= 2

    diffusers' warm-up (Flow-GRPO's EMAModuleWrapper uses the same ramp, counted from its first
    optimizer step instead). The shadow starts as the untrained weights; at a constant decay of
    0.99 they would still hold a third of it after 100 updates, so early evaluations and saves would
    show mostly the model training started from. The warm-up drops the start at the first update
    and lets the average lengthen with the run, reaching `decay` after 9 d / (1 - d) updates (81 at
    0.9). This is a ramp, not Adam's bias correction (dividing by 1 - decay^k): that would assume a
    zero start, which untrained weights are not.
    """

    def __init__(self, params: list[nn.Parameter], decay: float, every: int) -> None:
        from diffusers.training_utils import EMAModel

        self.params = params
        self.every = every
        self.steps = 0  # optimizer steps seen; the average's own count is its number of updates
        self.average = EMAModel(params, decay=decay, foreach=True)  # one kernel for all tensors
        self.average.to(device=params[0].device, dtype=torch.float32)

    @property
    def shadow(self) -> list[torch.Tensor]:
        """The averaged weights, in the order of `params`."""
        return self.average.shadow_params

    def optimizer_stepped(self) -> None:
        """Count one optimizer step that changed the weights; update the average on every `every`-th."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.average.step(self.params)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the network inside the block; the trained ones back, bit for bit, after.

        The trained weights wait in CPU memory meanwhile (diffusers' store/restore): one copy of
        the trainable parameters, only while the block runs.
        """
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s values; the shadow goes back to the parameters' device (checkpoints load on CPU)."""
        self.steps = state["steps"]
        self.average.load_state_dict(state["average"])
        self.average.to(device=self.params[0].device, dtype=torch.float32)


class AveragingOptimizer:
    """The run's optimizer as the algorithm sees it: every step that moves the weights also feeds the average.

    An algorithm calls `optimizer.step()` (update.update_policy once per accumulated step; others,
    as tests/plugins/rwr_algorithm, after every micro-batch, where Accelerate makes it a no-op until
    the gradients are synced), so hooking the step reaches every algorithm without widening the
    `Algorithm.update` protocol. A step counts when Accelerate's own does: gradients synced and
    not skipped for an overflow. Under DeepSpeed the engine has stepped inside `backward` by then
    and `step()` itself does nothing, so the weights averaged are the stepped ones either way.
    Everything else reaches the wrapped optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, average: WeightAverage, accelerator: Accelerator) -> None:
        self.optimizer, self.average, self.accelerator = optimizer, average, accelerator

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.optimizer.step(*args, **kwargs)
        if self.accelerator.sync_gradients and not self.optimizer.step_was_skipped:
            self.average.optimizer_stepped()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
