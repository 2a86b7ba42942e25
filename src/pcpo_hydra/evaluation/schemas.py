"""The `eval` group's schema (conf/eval/*.yaml), checked before any model is built (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

from omegaconf import MISSING, OmegaConf

from pcpo_hydra.config.checks import at_least, checked, interval, positive
from pcpo_hydra.config.registry import register


@register("eval", None)
@dataclass
class EvalSchema:
    """Every `every` epochs (and at the last, and at epoch 0 for the base model) sample a fixed set and score it."""

    every: int = checked(at_least(0))     # epochs between evaluations; 0: no evaluation
    holdout: int = checked(at_least(0))   # prompts carved off the training set, never drawn by training
    group_size: int = checked(positive())  # images per evaluated prompt
    seed: int = checked(interval(0, 2**32 - 1))  # the evaluation noise: the same at every evaluation
    sampler: Optional[Any] = MISSING      # a sampler node; null: the training sampler, as the algorithm prepared it
    # name -> reward node scored besides the training reward (eval/reward_*), logged as eval/<name>_mean and _std
    rewards: dict[str, Any] = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """Evaluating needs prompts; the sampler and reward nodes are checked by their own groups' schemas.

        (Not NESTED: that makes an empty map an error, and `rewards: {}` is the common case.)
        """
        if self.every and not self.holdout:
            yield f"{prefix}.holdout=0: evaluation ({prefix}.every={self.every}) needs held-out prompts; set {prefix}.holdout>=1"
        # The one check of a group node; imported here: validation imports the registry, which imports us.
        from pcpo_hydra.config.validation import _check_node

        problems: list[str] = []
        if self.sampler is not None:
            _check_node("sampler", OmegaConf.create(self.sampler), f"{prefix}.sampler", problems)
        for name, node in self.rewards.items():
            if name == "reward":
                problems.append(f"{prefix}.rewards.reward: the training reward is always scored as eval/reward; "
                                "name this one otherwise")
            _check_node("reward", OmegaConf.create(node), f"{prefix}.rewards.{name}", problems)
        yield from problems
