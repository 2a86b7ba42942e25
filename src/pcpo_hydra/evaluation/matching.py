"""Which checkpoint of a run reached a given evaluation reward: compare algorithms at equal reward, not equal epochs.

PCPO reaches a reward in fewer epochs than GRPO, so images of the same epoch compare a further-trained
policy with a less-trained one; the paper compares checkpoints of equal reward instead. The reward
is the evaluation callback's, one JSON line per evaluation in `<run_dir>/eval_history.jsonl`, on
held-out prompts with fixed noise, so two epochs' numbers differ only by the policy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pcpo_hydra.checkpoint import WEIGHTS, damage, saved_checkpoints

EVAL_HISTORY = "eval_history.jsonl"
REWARD_KEY = "eval/reward_mean"
PICKS = ("nearest", "below", "above")


class MatchError(ValueError):
    """No checkpoint of a run can be matched; the one-line message names the run dir and what is missing."""


@dataclass(frozen=True)
class Match:
    """The checkpoint chosen for a target reward: `weights` is None for epoch 0, the base model."""

    run_dir: Path
    epoch: int
    reward: float
    weights: Path | None
    pick: str


def eval_history(run_dir: Path, key: str = REWARD_KEY) -> dict[int, float]:
    """Epoch -> `key` from the run's eval_history.jsonl, oldest first.

    A resumed run may evaluate an epoch again: the last line for an epoch wins. A line without the
    key, with a value that is not finite, or cut short by a crash mid-write is passed over.
    """
    path = Path(run_dir) / EVAL_HISTORY
    if not path.is_file():
        raise MatchError(f"{run_dir}: no {EVAL_HISTORY} (train with eval=holdout to record evaluations)")
    history = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            epoch, value = int(entry["epoch"]), float(entry[key])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(value):
            history[epoch] = value
    return dict(sorted(history.items()))


def checkpoints_by_epoch(run_dir: Path) -> dict[int, Path]:
    """Epoch -> checkpoint folder, for the run's checkpoints whose files still match their manifest."""
    return {epoch: path for epoch, path in saved_checkpoints(run_dir).items() if damage(path) is None}


def match_reward(run_dir: Path, target: float, pick: str = "nearest", key: str = REWARD_KEY) -> Match:
    """The evaluated epoch with an intact checkpoint whose `key` is nearest `target`, or just below or above it.

    "nearest": |reward - target| smallest, the earlier epoch on a tie; "below": the highest reward
    <= target; "above": the lowest reward >= target (the pair that brackets the target, as the
    paper's human study used). Epoch 0, the base model, counts when it was evaluated. A run with
    no intact checkpoint at an evaluated epoch after 0 is a MatchError even so: matching it would
    only ever return the base model.
    """
    if pick not in PICKS:
        raise ValueError(f"pick={pick!r}: one of {', '.join(PICKS)}")
    history = eval_history(run_dir, key)
    if not history:
        raise MatchError(f"{run_dir}: {EVAL_HISTORY} has no finite {key!r} (is it the name of an evaluated reward?)")
    intact = checkpoints_by_epoch(run_dir)
    checkpoints = {epoch: path for epoch, path in intact.items() if (path / WEIGHTS).is_dir()}
    if intact and not checkpoints:
        raise MatchError(f"{run_dir}: its checkpoints hold no {WEIGHTS}/ folder (a DeepSpeed run's keep only the "
                         "engine's shards); sample its final_weights instead")
    rewards = {epoch: reward for epoch, reward in history.items() if epoch == 0 or epoch in checkpoints}
    if set(rewards) <= {0}:
        raise MatchError(f"{run_dir}: no intact checkpoint at any evaluated epoch (evaluated: {_epochs(history)}; "
                         f"intact checkpoints: {_epochs(checkpoints) or 'none'}); set checkpoint_every to a "
                         f"multiple of eval.every and keep_checkpoints high enough")
    allowed, distance = {"nearest": (lambda reward: True, lambda reward: abs(reward - target)),
                         "below": (lambda reward: reward <= target, lambda reward: -reward),
                         "above": (lambda reward: reward >= target, lambda reward: reward)}[pick]
    candidates = {epoch: reward for epoch, reward in rewards.items() if allowed(reward)}
    if not candidates:
        low, high = min(rewards.values()), max(rewards.values())
        raise MatchError(f"{run_dir}: no checkpoint with {key} {'<=' if pick == 'below' else '>='} {target:.6g} "
                         f"(the rewards found run from {low:.6g} to {high:.6g})")
    # min keeps the first of equals and the candidates run oldest first: a tie goes to the earlier epoch
    epoch = min(candidates, key=lambda e: distance(candidates[e]))
    weights = None if epoch == 0 else checkpoints[epoch] / WEIGHTS
    return Match(Path(run_dir), epoch, candidates[epoch], weights, pick)


def _epochs(by_epoch: dict[int, object]) -> str:
    """The epochs of a mapping for a message, shortened when there are many."""
    epochs = [str(epoch) for epoch in by_epoch]
    return ", ".join(epochs) if len(epochs) <= 8 else f"{', '.join(epochs[:3])}, ..., {epochs[-1]}"
