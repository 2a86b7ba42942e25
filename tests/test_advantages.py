"""Advantages: group statistics by hand, NaN handling, and the per-prompt tracker's state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pcpo_hydra.algorithms import PerPromptStatTracker, clip_advantages, group_advantages


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0]), 4)
    std = math.sqrt(1.25)  # population std of 1..4
    expected = [(r - 2.5) / (std + 1e-4) for r in (1, 2, 3, 4)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_nonfinite_rewards_are_left_out_and_get_zero():
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("inf"), float("nan"), float("nan")])
    adv = group_advantages(rewards, 3)
    # group 1: finite {1, 3}: mean 2, std 1; group 2 (inf, nan, nan): nothing finite
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0])


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="rollout.group_size=4"):
        group_advantages(torch.zeros(6), 4)


def test_clip_advantages():
    assert clip_advantages(torch.tensor([-9.0, 0.5, 7.0]), 5.0).tolist() == [-5.0, 0.5, 5.0]
    with pytest.raises(ValueError, match="adv_clip_max"):
        clip_advantages(torch.zeros(1), 0.0)


def population(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_tracker_falls_back_to_batch_stats_then_uses_its_buffer():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    first = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 2.0, 3.0, 5.0]))
    mean, std = population([1.0, 2.0, 3.0, 5.0])
    assert first.tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in (1, 2, 3, 5)])
    second = tracker.update(["a", "b"], torch.tensor([6.0, 4.0]))
    mean_a, std_a = population([1.0, 2.0, 6.0])  # 'a' now has min_count rewards of its own
    mean_b, std_b = population([3.0, 5.0, 4.0])
    assert second.tolist() == pytest.approx([(6 - mean_a) / (std_a + 1e-6), (4 - mean_b) / (std_b + 1e-6)])
    tracker.update(["a"], torch.tensor([7.0]))
    assert list(tracker.buffers["a"]) == [2.0, 6.0, 7.0]  # the oldest reward left the buffer


def test_tracker_state_round_trip():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["x", "y", "x"], torch.tensor([0.5, 1.5, 2.5]))
    state = json.loads(json.dumps(tracker.state_dict()))  # plain lists survive any serialiser
    restored = PerPromptStatTracker(buffer_size=4, min_count=2)
    restored.load_state_dict(state)
    batch = (["x", "y", "z"], torch.tensor([1.0, 3.0, 2.0]))
    assert torch.equal(tracker.update(*batch), restored.update(*batch))


def test_tracker_rejects_nonfinite_rewards():
    with pytest.raises(ValueError, match="finite"):
        PerPromptStatTracker(4, 2).update(["a"], torch.tensor([float("nan")]))
