"""The `eval` group's schema (conf/eval/*.yaml), checked before any model is built (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

from omegaconf import MISSING

from pcpo_hydra.config.checks import at_least, checked, interval, positive
from pcpo_hydra.config.registry import Nested, register


@register("eval", None)
@dataclass
class EvalSchema:
    """Every `every` epochs (and at the last, and at epoch 0 for the base model) sample a fixed set and score it."""

    every: int = checked(at_least(0))     # epochs between evaluations; 0: no evaluation
    holdout: int = checked(at_least(0))   # prompts carved off the training set, never drawn by training
    prompts: Optional[Any] = MISSING      # a prompts node evaluated instead of a held-out split; null: the split
    group_size: int = checked(positive())  # images per evaluated prompt
    seed: int = checked(interval(0, 2**32 - 1))  # image j of a prompt has seed `seed + j`, at every evaluation
    sampler: Optional[Any] = MISSING      # a sampler node; null: the training sampler, as the algorithm prepared it
    deterministic: bool = MISSING         # true: no noise after the first latent (DDIM eta 0, the flow ODE)
    # name -> reward node scored besides the training reward (eval/reward_*), logged as eval/<name>_mean and _std
    rewards: dict[str, Any] = MISSING

    # The sampler and reward nodes are whole nodes of their groups, checked (and preflighted) by their schemas.
    NESTED: ClassVar[dict[str, Nested]] = {"sampler": Nested("sampler", many=False),
                                            "prompts": Nested("prompts", many=False),
                                            "rewards": Nested("reward", may_be_empty=True)}

    def relations(self, prefix: str) -> Iterator[str]:
        """Evaluating needs prompts from one place, and the training reward's name is taken."""
        if self.every and not self.holdout and self.prompts is None:
            yield (f"{prefix}.holdout=0: evaluation ({prefix}.every={self.every}) needs held-out prompts; set "
                   f"{prefix}.holdout>=1, or give a prompt set: +prompts@{prefix}.prompts=<option>")
        if self.holdout and self.prompts is not None:
            yield (f"{prefix}.holdout={self.holdout}: {prefix}.prompts is set, so nothing is held out of training; "
                   f"set {prefix}.holdout=0")
        if "reward" in self.rewards:
            yield (f"{prefix}.rewards.reward: the training reward is always scored as eval/reward; "
                   "name this one otherwise")
