"""`Algorithm`: everything the training loop asks of a method, so a new method plugs in without editing it.

Torch-free to import (annotations only), so a plugin's schema module may import it beside its schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from omegaconf import DictConfig
    from torch import Tensor

    from pcpo_hydra.models.base import PolicyModel
    from pcpo_hydra.rollout import Trajectories
    from pcpo_hydra.samplers.base import BaseSampler


@runtime_checkable
class Algorithm(Protocol):
    """A training method: how an epoch's rewards become advantages and how its rollouts update the policy.

    The loop (`loop.Trainer`) owns the rest. Each epoch it draws the prompts, rolls them out with
    the sampler `prepare` returned (one trajectory per sample: latents and network outputs at
    every step, the stored noise, per-step log-probs, the final images), scores the images with
    the reward, gathers the rewards of all ranks, calls `advantages` with the epoch's global
    prompts and rewards (the same call on every rank), stores this rank's rows of the result as
    `traj.advantages`, and calls `update` with this rank's trajectories. It logs what `update`
    returns and checkpoints `state_dict()`, which a resumed run hands back to `load_state_dict`.

    Building one: a YAML under conf/algorithm/ names a `_target_` (a class or a factory) that
    Hydra calls with the node's keys plus `group_size` (rollout.group_size); a schema registered
    with `@register("algorithm")` in a `schemas` module of the target's package checks the node
    before anything is built. GRPO and PCPO are presets of `ClippedPolicyGradient`
    (algorithms/clipped.py); a test-side example is tests/plugins/rwr_algorithm.
    """

    def prepare(self, model: PolicyModel, sampler: BaseSampler) -> BaseSampler:
        """Once, before the accelerator wraps the network: return the sampler to roll out and update with.

        The place to change the configured sampler (PCPO's variance mode changes its stds) and to
        ask the model for what the update will need (`model.keep_reference()` for a KL penalty).
        """

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Tensor[N]: one advantage per sample of the epoch, all ranks' N samples in their global order.

        Tensor[N, K] (one per stored step) when the algorithm's own `score` gives per-step rewards
        (below, "Optional members"); `rewards` then has that shape too.

        Samples of one prompt's group are consecutive. A NaN or inf reward is a failed reward call
        and must not train. Every rank gets the same call and must return the same values.
        """

    def update(
        self,
        traj: Trajectories,
        model: PolicyModel,
        sampler: BaseSampler,
        optimizer: torch.optim.Optimizer,
        accelerator: Accelerator,
        train: DictConfig,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """Train on this rank's trajectories (advantages set); return the epoch's `train/<name>` statistics.

        Stored step k of `traj` is the sampler's step `traj.first_step + k`: with an SDE window
        (sampler.sde_window) the rollout stores only the window's steps, and `sampler` is the
        window's copy of what `prepare` returned.
        `traj.kept` (None: all) marks the samples to train on: with `rollout.drop_flat_groups` the
        groups of equal rewards are left out, so ranks may keep different numbers, none included
        (`update.micro_batches` pads them to the same calls). The loop runs this, and the rollout,
        inside `model.guided(train.cfg)`, so `model.predict` already guides as the run trains.

        `train` is the run's train node (batch_size, inner_epochs, timestep_fraction,
        steps_per_forward, max_grad_norm, max_nan_steps); `generator` is the run's shuffle stream,
        checkpointed by the loop, so a resumed run shuffles as an uninterrupted one. The
        accelerator was built to step the optimizer once per `build.accumulation_steps(cfg)`
        backward passes (train.batch_size samples x train.steps_per_forward steps each): run each
        backward inside `accelerator.accumulate(model.network)` and make that many per optimizer
        step. With train.ema, `optimizer.step()` also updates the average whenever it really steps
        (ema.AveragingOptimizer). Every rank must make the same collective calls and return the same keys, which the
        loop averages over the ranks and logs.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides weights, optimizer and RNG streams (e.g. running reward statistics)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


# Optional members: an algorithm that has them changes the loop's rollout or scoring (SDPO has both);
# the functions below read them, and stand in for them when an algorithm has none.
#
#   initial_noise_group: int
#       Runs of this many consecutive samples start from the same initial latent (their later noise
#       differs). The rollout and the sampling batches keep such runs whole.
#   score(traj, model, sampler, reward, batch_size) -> (rewards, parts)
#       Score this rank's rollouts instead of the reward scoring `traj.images`: rewards are Tensor[n]
#       or Tensor[n, K] (one per stored step, the last column the final reward), parts a dict of
#       per-sample Tensor[n] the loop logs as reward/<name>_*. `advantages` then receives all ranks'
#       rewards of that shape and returns advantages of the same shape. `batch_size` is
#       rollout.batch_size, the most images to decode at once.


def initial_noise_group(algorithm: Algorithm) -> int:
    """How many consecutive samples share their initial noise under `algorithm` (1: none)."""
    return int(getattr(algorithm, "initial_noise_group", 1))


def score_rollouts(
    algorithm: Algorithm, traj: Trajectories, model: PolicyModel, sampler: BaseSampler, reward: Any, batch_size: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The epoch's rewards of this rank's rollouts: the algorithm's own `score`, else the reward of the final images."""
    score = getattr(algorithm, "score", None)
    if score is None:
        return reward.score_parts(traj.images, traj.prompts)
    return score(traj, model, sampler, reward, batch_size)
