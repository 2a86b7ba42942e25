"""SDPO (algorithms/sdpo.py): each part against hand-computed values, then the parts in the loop."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from pcpo_hydra.algorithms.sdpo import (
    SDPO, PerStepStats, RewardDifferenceLoss, anchor_similarities, dense_rewards, discounted_returns,
)
from pcpo_hydra.config.validation import ConfigError, validate
from pcpo_hydra.update import MicroBatch, Schedule, _members, _schedule, micro_batches

SDPO_RUN = ["algorithm=sdpo"]

# Clean-sample predictions of one trajectory of 5 steps, as 3-vectors: step 1 is orthogonal to both
# ends, so it is the anchor; steps 2 and 3 lie between them at known angles.
X0 = torch.tensor([[[1.0, 0, 0], [0, 0, 1], [2, 1, 0], [1, 2, 2], [0, 1, 0]]])
SCORED = torch.tensor([[1.0, 2.0, 3.0]])  # rewards of the first, the anchor's and the last prediction


def test_the_anchor_is_the_step_least_like_both_ends_and_other_steps_mix_the_three_by_cosine() -> None:
    anchor, first, middle, last = anchor_similarities(X0)
    assert anchor.tolist() == [1]
    root5 = math.sqrt(5)
    assert first[0].tolist() == pytest.approx([1, 0, 2 / root5, 1 / 3, 0])
    assert middle[0].tolist() == pytest.approx([0, 1, 0, 2 / 3, 0])
    assert last[0].tolist() == pytest.approx([0, 0, 1 / root5, 2 / 3, 1])
    dense = dense_rewards(SCORED, anchor, first, middle, last)
    # step 2: (1 * 2/sqrt5 + 3 * 1/sqrt5) / (3/sqrt5) = 5/3; step 3: (1/3 + 2 * 2/3 + 3 * 2/3) / (5/3) = 11/5
    assert dense[0].tolist() == pytest.approx([1.0, 2.0, 5 / 3, 11 / 5, 3.0])


def test_with_one_or_two_steps_the_anchor_coincides_with_the_first_step_and_keeps_its_reward() -> None:
    two = X0[:, [0, 4]]
    anchor, *similarities = anchor_similarities(two)
    assert anchor.tolist() == [0]  # a tie between the ends: the first, as argmin breaks it
    assert dense_rewards(SCORED, anchor, *similarities)[0].tolist() == [2.0, 3.0]  # the anchor's is written last


def test_returns_discount_later_rewards_by_gamma_per_step() -> None:
    returns = discounted_returns(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]), gamma=0.5)
    assert returns.tolist() == [[2.75, 3.5, 3.0], [0.25, 0.5, 1.0]]
    assert discounted_returns(torch.tensor([[1.0, 2.0]]), gamma=0.0).tolist() == [[1.0, 2.0]]


def test_each_step_is_normalised_by_its_batch_until_its_prompt_has_min_count_returns_then_by_its_own() -> None:
    stats = PerStepStats(buffer_size=4, min_count=3)
    first = stats(["a", "a", "b", "b"], torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0], [7.0, 40.0]]))
    # every (prompt, step) has 2 < 3 returns: each step's batch mean and population std
    std0, std1 = math.sqrt(5.0), math.sqrt(125.0)
    assert first[:, 0].tolist() == pytest.approx([(r - 4) / (std0 + 1e-6) for r in (1, 3, 5, 7)])
    assert first[:, 1].tolist() == pytest.approx([(r - 25) / (std1 + 1e-6) for r in (10, 20, 30, 40)])
    restored = PerStepStats(buffer_size=4, min_count=3)
    restored.load_state_dict(stats.state_dict())
    for tracker in (stats, restored):
        second = tracker(["a", "a", "c", "c"], torch.tensor([[2.0, 0.0], [4.0, 0.0], [9.0, 1.0], [9.0, 3.0]]))
        # "a" now has 4 returns at each step: [1, 3, 2, 4] -> mean 2.5, std sqrt(1.25); "c" uses the batch
        assert second[0, 0].item() == pytest.approx((2 - 2.5) / (math.sqrt(1.25) + 1e-6))
        assert second[0, 1].item() == pytest.approx((0 - 7.5) / (math.sqrt(68.75) + 1e-6))  # [10, 20, 0, 0]
        assert second[2, 1].item() == pytest.approx((1 - 1.0) / (math.sqrt(1.5) + 1e-6))  # batch [0, 0, 1, 3]


def test_a_sample_with_a_failed_reward_gets_no_advantage_and_leaves_the_statistics_alone() -> None:
    stats = PerStepStats(buffer_size=8, min_count=1)
    advantages = stats(["a", "a", "a"], torch.tensor([[1.0], [float("nan")], [3.0]]))
    assert advantages[:, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    assert list(stats.trackers[0].buffers["a"]) == [1.0, 3.0]


class FixedLogProbs:
    """A sampler stand-in whose new log-probs are given, so the loss is checked on its own arithmetic."""

    def __init__(self, log_probs: list[float]) -> None:
        self.new = torch.tensor(log_probs, requires_grad=True)

    def log_prob(self, i, x, f, prev):
        return self.new


def test_the_loss_of_known_pairs_is_the_larger_of_the_plain_and_clipped_squared_errors() -> None:
    loss_fn = RewardDifferenceLoss(lam=0.5, log_scale=1.0, clip_range=0.2, adv_clip_max=5.0)
    sampler = FixedLogProbs([0.3, 0.1, 0.0, 0.05])
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -0.5, 0.2, 0.2])
    i = torch.tensor([2, 2, 0, 0])
    loss, stats = loss_fn.step_loss(i, sampler, *[torch.zeros(4, 1)] * 5, old, advantages)
    # pair 1 at step 2: w = 0.25, d = 0.2, clipped d = 0.2 - 0.1 = 0.1, dA = 1.5
    #   plain (0.05 - 1.5)^2 = 2.1025, clipped (0.025 - 1.5)^2 = 2.175625 -> the clipped one
    # pair 2 at step 0: w = 1, d = -0.05 (inside the clip), dA = 0 -> 0.0025 both
    assert loss.item() == pytest.approx((2.175625 + 0.0025) / 2)
    assert stats["clipfrac"].item() == 0.5
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.09 + 0.01 + 0.0025) / 4)
    loss.backward()
    # the clipped branch of pair 1 passes no gradient to its first member (outside the clip), only to the second
    assert sampler.new.grad.tolist() == pytest.approx([0.0, 0.5 * 2 * (0.025 - 1.5) * -0.25, -0.05, 0.05],
                                                      abs=1e-6)


def test_advantages_beyond_adv_clip_max_are_clipped_and_counted() -> None:
    loss_fn = RewardDifferenceLoss(lam=1.0, log_scale=2.0, clip_range=1.0, adv_clip_max=1.0)
    loss, stats = loss_fn.step_loss(0, FixedLogProbs([0.0, 0.0]), *[torch.zeros(2, 1)] * 5, torch.zeros(2),
                                    torch.tensor([3.0, -0.5]))
    assert loss.item() == pytest.approx(1.5**2)  # dA = clip(3) - (-0.5) = 1.5
    assert stats["adv_clipfrac"].item() == 0.5


def test_sdpo_advantages_are_per_step_normalised_discounted_returns() -> None:
    sdpo = SDPO(gamma=0.5, lam=0.99, log_scale=1.0, clip_range=1e-4, adv_clip_max=5.0, stat_buffer_size=32,
                stat_min_count=16, shuffle_batch=True, shuffle_timestep=True, group_size=2)
    rewards = torch.tensor([[1.0, 2.0], [0.0, 4.0]])  # returns [2, 2] and [2, 4]
    advantages = sdpo.advantages(["p", "p"], rewards)
    assert advantages.flatten().tolist() == pytest.approx([0.0, -1.0, 0.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="rollout.group_size=3"):
        SDPO(0.99, 0.99, 1.0, 1e-4, 5.0, 32, 16, True, True, group_size=3)


def test_the_steps_major_schedule_trains_one_step_slot_across_all_micro_batches_with_pairs_side_by_side() -> None:
    steps = torch.tensor([[2, 0, 1], [1, 2, 0]])
    batches = [MicroBatch(torch.tensor([0]), steps[:1], 1.0), MicroBatch(torch.tensor([1]), steps[1:], 1.0)]
    order = [(batch.rows.tolist(), s.tolist(), w) for batch, _, s, w in _schedule(batches, 1, steps_major=True)]
    assert order == [([0], [2], 1.0), ([1], [1], 1.0), ([0], [0], 1.0), ([1], [2], 1.0), ([0], [1], 1.0),
                     ([1], [0], 1.0)]
    samples_major = [s.tolist() for _, _, s, _ in _schedule(batches, 1, steps_major=False)]
    assert samples_major == [[2], [0], [1], [1], [2], [0]]
    rows, member_steps = _members(torch.tensor([3, 0]), torch.tensor([5, 1]), 2)
    assert rows.tolist() == [6, 7, 0, 1] and member_steps.tolist() == [5, 5, 1, 1]


def test_unshuffled_micro_batches_keep_sample_and_step_order() -> None:
    kept = torch.arange(4)
    plain = micro_batches(kept, kept[:0], [4], 0, 2, 1, 3, 3, torch.Generator().manual_seed(0),
                          Schedule(unit=2, steps_major=True, shuffle_batch=False, shuffle_steps=False))
    assert [b.rows.tolist() for b in plain] == [[0, 1], [2, 3]]
    assert all(b.steps.tolist() == [[0, 1, 2], [0, 1, 2]] for b in plain)


def test_ddim_clean_estimate_is_diffusers_own_x0_prediction() -> None:
    from diffusers import DDIMScheduler

    from pcpo_hydra.models.tiny import SD_SCHEDULE
    from pcpo_hydra.samplers.ddim import DDIMSampler

    scheduler = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    sampler = DDIMSampler(scheduler, num_steps=4, eta=1.0)
    scheduler.set_timesteps(4)
    x, eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).chunk(2)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(eps, t, x, eta=0.0).pred_original_sample
        assert torch.allclose(sampler.clean_estimate(i, x, eps), expected, atol=1e-5), i


def test_flow_clean_estimate_follows_the_velocity_to_sigma_zero() -> None:
    from pcpo_hydra.samplers.flow_sde import FlowGRPOSampler

    sampler = FlowGRPOSampler(torch.tensor([1.0, 0.6, 0.0]), noise_level=0.7)
    x0, noise = torch.ones(1, 2), torch.full((1, 2), 3.0)
    x = 0.4 * x0 + 0.6 * noise  # x_sigma at sigma = 0.6; the exact velocity is noise - x0
    assert sampler.clean_estimate(1, x, noise - x0)[0].tolist() == pytest.approx([1.0, 1.0])


def test_pairs_start_from_the_same_noise_and_then_draw_their_own() -> None:
    from pcpo_hydra.models.tiny import build_tiny_sd
    from pcpo_hydra.rollout import sample_trajectories
    from pcpo_hydra.samplers.ddim import DDIMSampler

    model = build_tiny_sd(guidance_scale=1.0)
    sampler = DDIMSampler(model.scheduler, 3, eta=1.0)
    traj = sample_trajectories(model, sampler, ["a cat"] * 4, 4, [torch.Generator().manual_seed(0)], same_noise=2)
    start = traj.latents[:, 0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3])
    assert not torch.equal(start[0], start[2])
    assert not torch.equal(traj.noise[0], traj.noise[1])  # each member's per-step noise is its own


def test_score_mixes_three_scored_predictions_and_marks_pairs_with_a_failed_reward() -> None:
    from pcpo_hydra.models.tiny import build_tiny_sd
    from pcpo_hydra.rollout import sample_trajectories
    from pcpo_hydra.samplers.ddim import DDIMSampler

    class MeanBrightness:
        """Scores an image by its mean; the third image of every call fails."""

        def __init__(self) -> None:
            self.calls: list[torch.Tensor] = []

        def score_parts(self, images, prompts):
            self.calls.append(images)
            scores = images.mean((1, 2, 3))
            scores[2] = float("nan")
            return scores, {}

    model = build_tiny_sd(guidance_scale=1.0)
    sampler = DDIMSampler(model.scheduler, 4, eta=1.0)
    traj = sample_trajectories(model, sampler, ["a cat"] * 4, 4, [torch.Generator().manual_seed(1)], same_noise=2)
    sdpo = SDPO(0.99, 0.99, 1.0, 1e-4, 5.0, 32, 16, True, True, group_size=2)
    reward = MeanBrightness()
    dense, parts = sdpo.score(traj, model, sampler, reward, batch_size=3)
    x0 = torch.stack([sampler.clean_estimate(k, traj.latents[:, k], traj.outputs[:, k]) for k in range(4)], 1)
    anchor, *similarities = anchor_similarities(x0)
    first, middle, last = (model.decode(x0[torch.arange(4), k]) for k in (torch.zeros(4, dtype=torch.long),
                                                                          anchor, torch.full((4,), 3)))
    assert [torch.allclose(call, image, atol=1e-5) for call, image in zip(reward.calls, (first, middle, last))] \
        == [True, True, True]
    scored = torch.stack([image.mean((1, 2, 3)) for image in (first, middle, last)], 1)
    scored[2] = float("nan")
    assert torch.allclose(dense[[0, 1, 3]], dense_rewards(scored, anchor, *similarities)[[0, 1, 3]])
    assert dense[2].isnan().all()
    assert parts["at_step_1"].tolist()[:2] == pytest.approx(scored[:2, 0].tolist())
    assert parts["at_step_4"].tolist()[:2] == pytest.approx(scored[:2, 2].tolist())
    assert traj.kept.tolist() == [True, True, False, False]  # the failed sample's partner goes too
    assert torch.allclose(traj.images, last, atol=1e-5)  # decoded in chunks of 3 there, at once here


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.group_size=3", "rollout.group_size=3: algorithm=sdpo trains pairs"),
        ("rollout.drop_flat_groups=true", "rollout.drop_flat_groups=true: algorithm=sdpo"),
        ("sampler.sde_window.size=2", "sampler.sde_window.size=2: algorithm=sdpo"),
        ("algorithm.lam=0", "algorithm.lam=0"),
    ],
)
def test_what_sdpo_cannot_train_is_refused_by_key_before_anything_is_built(compose_cfg, override, message) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(compose_cfg(*SDPO_RUN, override))


def test_sdpo_accumulates_over_one_slot_of_micro_batches(compose_cfg) -> None:
    from pcpo_hydra.build import accumulation_steps

    cfg = validate(compose_cfg(*SDPO_RUN, "train.steps_per_forward=1"))
    micro_batches_per_update = 8 * 4 // 4 // 4  # tiny recipe: 8 prompts x 4, train.batch_size 4, num_updates 4
    assert accumulation_steps(cfg) == micro_batches_per_update
    clipped = validate(compose_cfg("train.steps_per_forward=1"))
    assert accumulation_steps(clipped) == micro_batches_per_update * clipped.sampler.num_steps
    assert OmegaConf.select(cfg, "algorithm.gamma") == 0.99


@pytest.mark.integration
def test_pcpo_train_with_sdpo_on_the_tiny_few_step_model_raises_the_final_reward(tmp_path) -> None:
    """The embedded run with algorithm=sdpo: its last step's reward rises, and the reference's figures are logged."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    from test_training import only_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 30
    result = subprocess.run(
        [sys.executable, "-m", "pcpo_hydra.train", "algorithm=sdpo", "model=tiny_sd_turbo", f"epochs={epochs}",
         "checkpoint_every=0", "log_images_every=0", f"hydra.run.dir={tmp_path / 'run'}",
         f"text_cache_dir={tmp_path / 'cache'}"],
        env={**os.environ, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(store)
    _, run = only_run(client)

    def history(name: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]

    final = history("reward/at_step_10_mean")
    assert len(final) == epochs
    assert sum(final[-5:]) / 5 > sum(final[:5]) / 5 + 0.05  # jpeg compressibility of the last prediction rises
    assert history("rollout/reward_mean") == pytest.approx(final)  # the run's reward is the last step's
    assert len(history("reward/at_step_1_mean")) == epochs  # and the one-step prediction's is logged beside it
    assert history("rollout/step_10_reward_mean") == pytest.approx(final)
    assert all(math.isfinite(v) for v in history("rollout/step_5_reward_mean"))
    # the tiny recipe trains all 10 steps in one slot (train.steps_per_forward=10): 4 updates per slot
    assert set(history("train/num_updates")) == {4.0}
    assert all(0.0 <= v <= 1.0 for v in history("train/clipfrac")) and max(history("train/clipfrac")) > 0.0
    assert all(v > 0 for v in history("train/approx_kl"))
