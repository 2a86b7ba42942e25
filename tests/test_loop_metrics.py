"""Epoch statistics the loop logs besides rewards: within-group diversity."""

from __future__ import annotations

import math

import torch

from pcpo_hydra.loop import group_diversity


def test_group_diversity_is_the_mean_pairwise_rms_distance_within_each_group() -> None:
    white, black, grey = torch.ones(3, 4, 4), torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5)
    # group 1: white, black (distance 1); group 2: grey, grey (distance 0) -> mean 0.5
    images = torch.stack([white, black, grey, grey])
    assert group_diversity(images, group_size=2) == 0.5
    # one group of three: pairs (w,b)=1, (w,g)=0.5, (b,g)=0.5 -> 2/3
    assert math.isclose(group_diversity(torch.stack([white, black, grey]), group_size=3), 2 / 3, rel_tol=1e-6)


def test_group_diversity_of_identical_images_is_zero_and_undefined_for_single_images() -> None:
    same = torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1)
    assert group_diversity(same, group_size=4) == 0.0
    assert math.isnan(group_diversity(same, group_size=1))
