"""SDPO: dense-reward difference learning for few-step models (Zhang et al., TPAMI 2026).

Stepwise Diffusion Policy Optimization trains on pairs of trajectories of one prompt that start
from the same noise. At every step of a trajectory the network's output also predicts the clean
sample x0 (the "dual state": what a one-step sampler would return from there). The reward model
scores those predictions at three steps only, the first, the last and one anchor, the step
whose prediction is least like both ends; every other step's reward is the average of the three
weighted by the cosine similarity of its latent prediction to theirs. Discounted returns of these
dense rewards, normalised per (prompt, step) with running statistics, give one advantage per step,
and the loss asks each step's difference of log-ratios within a pair (weighted lam^i) to equal
the difference of the pair's advantages, clipped as PPO clips a ratio.

The reference is the authors' code (ZiyiZhang27/sdpo, scripts/train_sdpo.py); docs/design.md
("SDPO: dense rewards and reward differences") lists where this one differs. Nothing here exists in a maintained library, hence by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pcpo_hydra.algorithms.advantages import PerPromptStatTracker
from pcpo_hydra.update import Schedule, update_policy

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from pcpo_hydra.models.base import PolicyModel
    from pcpo_hydra.rollout import Trajectories
    from pcpo_hydra.samplers.base import BaseSampler, Index

PAIR = 2  # trajectories per SDPO pair: consecutive samples of one prompt, the same initial noise


def anchor_similarities(x0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(anchor [n], sim_first, sim_anchor, sim_last [n, K]) of clean-sample predictions x0 [n, K, ...].

    Similarities are cosines of the flattened latents to the first step's, the last step's and the
    anchor's prediction; the anchor is the step that minimises the sum of the first two.
    """
    flat = x0.flatten(2).float()
    sim_first = F.cosine_similarity(flat, flat[:, :1], dim=2)
    sim_last = F.cosine_similarity(flat, flat[:, -1:], dim=2)
    anchor = (sim_first + sim_last).argmin(1)
    chosen = flat[torch.arange(len(flat), device=flat.device), anchor]
    sim_anchor = F.cosine_similarity(flat, chosen[:, None], dim=2)
    return anchor, sim_first, sim_anchor, sim_last


def dense_rewards(scored: Tensor, anchor: Tensor, sim_first: Tensor, sim_anchor: Tensor, sim_last: Tensor) -> Tensor:
    """Tensor[n, K]: a reward for every step from the three scored ones (scored [n, 3]: first, anchor, last).

    Step k gets (R_f s_f + R_a s_a + R_l s_l) / (s_f + s_a + s_l) with its similarities s; the three
    scored steps keep their own rewards (the anchor's written last, as the reference does, so it
    wins where it coincides with the first step). The similarities are not clamped: as in the
    reference, a step whose prediction points away from all three can get a reward outside their range.
    """
    first, middle, last = scored.float().unbind(1)
    mixed = first[:, None] * sim_first + middle[:, None] * sim_anchor + last[:, None] * sim_last
    rewards = mixed / (sim_first + sim_anchor + sim_last)
    rewards[:, 0], rewards[:, -1] = first, last
    rewards[torch.arange(len(rewards), device=rewards.device), anchor] = middle
    return rewards


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Tensor[N, K]: G_k = r_k + gamma G_{k+1}, G_K = 0 (float64)."""
    returns = rewards.to(torch.float64).clone()
    for k in range(returns.shape[1] - 2, -1, -1):
        returns[:, k] += gamma * returns[:, k + 1]
    return returns


class PerStepStats:
    """Running (prompt, step) statistics: DDPO's per-prompt tracker, one per step.

    Below `min_count` rewards of a (prompt, step) the step's batch statistics stand in, as in the
    reference. A sample with a non-finite return at any step is left out and gets advantage 0.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.trackers: list[PerPromptStatTracker] = []

    def _tracker(self, step: int) -> PerPromptStatTracker:
        while len(self.trackers) <= step:
            self.trackers.append(PerPromptStatTracker(self.buffer_size, self.min_count))
        return self.trackers[step]

    def __call__(self, prompts: list[str], returns: Tensor) -> Tensor:
        finite = torch.isfinite(returns).all(1)
        kept = [p for p, ok in zip(prompts, finite.tolist()) if ok]
        advantages = torch.zeros_like(returns, dtype=torch.float64)
        if kept:
            for k in range(returns.shape[1]):
                advantages[finite, k] = self._tracker(k).update(kept, returns[finite, k])
        return advantages

    def state_dict(self) -> dict[str, Any]:
        return {"steps": [tracker.state_dict() for tracker in self.trackers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trackers = []
        for k, tracker_state in enumerate(state["steps"]):
            self._tracker(k).load_state_dict(tracker_state)


def pair_difference(values: Tensor) -> Tensor:
    """Tensor[B / 2]: each pair's first member's value minus its second's (rows 2j and 2j + 1)."""
    return values[0::PAIR] - values[1::PAIR]


class RewardDifferenceLoss:
    """SDPO's per-step objective on consecutive pairs of rows, for `update.update_policy`.

    With rho the direct log-ratio log pi_new - log pi_old of a step and A its clipped advantage,
    a pair (1, 2) at sampler step i contributes max((w d - dA)^2, (w d_c - dA)^2), w = lam^i / log_scale,
    d = rho_1 - rho_2, d_c the same with each rho clipped to [-clip_range, clip_range],
    dA = A_1 - A_2; the loss is their mean over the pairs.
    """

    kl_beta = 0.0  # no reference policy

    def __init__(self, lam: float, log_scale: float, clip_range: float, adv_clip_max: float) -> None:
        self.lam, self.log_scale, self.clip_range, self.adv_clip_max = lam, log_scale, clip_range, adv_clip_max

    def step_loss(
        self, i: Index, sampler: BaseSampler, x: Tensor, prev: Tensor, noise: Tensor,
        f_old: Tensor, f_new: Tensor, log_prob_old: Tensor, advantages: Tensor, f_ref: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(pair-mean loss, detached stats); rows 2j and 2j + 1 are a pair at the same step."""
        log_prob = sampler.log_prob(i, x, f_new, prev)
        rho = log_prob - log_prob_old.to(log_prob.dtype)
        clipped_adv = advantages.to(rho.dtype).clamp(-self.adv_clip_max, self.adv_clip_max)
        steps = torch.as_tensor(i, device=rho.device).expand(len(rho))[::PAIR].to(rho.dtype)
        weight = self.lam**steps / self.log_scale
        gap = pair_difference(clipped_adv)
        difference = pair_difference(rho)
        clipped = pair_difference(rho.clamp(-self.clip_range, self.clip_range))
        loss_plain = (weight * difference - gap) ** 2
        loss_clipped = (weight * clipped - gap) ** 2
        loss = torch.maximum(loss_plain, loss_clipped).mean()
        with torch.no_grad():
            stats = {
                "policy_loss": loss.detach(),
                "clipfrac": (loss_clipped > loss_plain).to(rho.dtype).mean(),
                "adv_clipfrac": (advantages.abs() > self.adv_clip_max).to(rho.dtype).mean(),
                "approx_kl": 0.5 * (rho**2).mean(),
                "log_ratio_abs": rho.abs().mean(),
            }
        return loss, stats


class SDPO:
    """An `Algorithm` (algorithms/base.py) with both optional members: paired initial noise and its own scoring.

    `group_size` (rollout.group_size) must be even: a group of 2m samples is m pairs of its prompt.
    """

    initial_noise_group = PAIR

    def __init__(
        self, gamma: float, lam: float, log_scale: float, clip_range: float, adv_clip_max: float,
        stat_buffer_size: int, stat_min_count: int, shuffle_batch: bool, shuffle_timestep: bool, group_size: int,
    ) -> None:
        if group_size % PAIR:
            raise ValueError(f"rollout.group_size={group_size}: algorithm=sdpo trains pairs, so it must be even")
        self.gamma = gamma
        self.loss = RewardDifferenceLoss(lam, log_scale, clip_range, adv_clip_max)
        self.stats = PerStepStats(stat_buffer_size, stat_min_count)
        self.schedule = Schedule(unit=PAIR, steps_major=True, shuffle_batch=shuffle_batch,
                                 shuffle_steps=shuffle_timestep)

    def prepare(self, model: PolicyModel, sampler: BaseSampler) -> BaseSampler:
        return sampler

    @torch.no_grad()
    def score(
        self, traj: Trajectories, model: PolicyModel, sampler: BaseSampler, reward: Any, batch_size: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(dense rewards [n, K], per-sample parts): the reward of three clean-sample predictions per trajectory.

        Also makes `traj.images` the last step's prediction (the image whose reward the run logs)
        and leaves out of the update (`traj.kept`) the pairs with a failed reward.
        """
        steps = traj.outputs.shape[1]
        x0 = torch.stack([
            sampler.clean_estimate(traj.first_step + k, traj.latents[:, k], traj.outputs[:, k]) for k in range(steps)
        ], 1)
        anchor, sim_first, sim_anchor, sim_last = anchor_similarities(x0)
        rows = torch.arange(len(x0), device=x0.device)
        chosen = {"first": x0[:, 0], "anchor": x0[rows, anchor], "last": x0[:, -1]}
        images, scores, parts = {}, [], {}
        for name, latents in chosen.items():
            images[name] = torch.cat([model.decode(chunk.to(traj.latents.dtype))
                                      for chunk in latents.split(batch_size)])
            score, score_parts = reward.score_parts(images[name], traj.prompts)
            scores.append(score.to(x0.device, torch.float32))
            if name == "last":
                parts.update(score_parts)
        scored = torch.stack(scores, 1)
        traj.images = images["last"]
        parts.update({"at_step_1": scored[:, 0], "at_anchor": scored[:, 1], f"at_step_{steps}": scored[:, 2],
                      "anchor_step": anchor.float() + 1})
        finite = torch.isfinite(scored).all(1).view(-1, PAIR).all(1)
        traj.kept = finite.repeat_interleave(PAIR)
        return dense_rewards(scored, anchor, sim_first, sim_anchor, sim_last), parts

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Tensor[N, K]: per-(prompt, step) normalised discounted returns of the dense rewards."""
        return self.stats(prompts, discounted_returns(rewards, self.gamma)).to(device=rewards.device, dtype=torch.float32)

    def update(
        self, traj: Trajectories, model: PolicyModel, sampler: BaseSampler, optimizer: torch.optim.Optimizer,
        accelerator: Accelerator, train: DictConfig, generator: torch.Generator,
    ) -> dict[str, float]:
        return update_policy(traj, model, sampler, self.loss, optimizer, accelerator, train, generator,
                             self.schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"per_step_stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["per_step_stats"])
