"""RankLayout: which samples of an epoch each rank draws, and the noise of its rollout batches."""

from __future__ import annotations

import torch

from pcpo_hydra.distributed import batch_seed
from pcpo_hydra.rank_layout import RankLayout


def layout(rank: int, world: int, prompts_per_rank: int) -> RankLayout:
    return RankLayout(rank, world, prompts_per_rank, group_size=3, batch_size=2, seed=7, device=torch.device("cpu"))


def test_each_rank_samples_its_own_contiguous_block_of_whole_groups() -> None:
    assert [layout(rank, 2, 2).rows for rank in (0, 1)] == [slice(0, 6), slice(6, 12)]
    assert layout(0, 1, 4).rows == slice(0, 12)


def test_every_rank_draws_the_same_global_prompts_each_repeated_for_its_group() -> None:
    prompts = ["a", "b", "c", "d", "e"]
    draws = [layout(rank, 2, 2).draw_prompts(prompts, torch.Generator().manual_seed(1)) for rank in (0, 1)]
    picks = torch.randint(5, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    assert draws[0] == draws[1] == [prompts[k] for k in picks for _ in range(3)]


def test_a_batchs_noise_seed_is_its_place_in_the_epoch_not_its_rank() -> None:
    """Two ranks of 2 prompts x 3 seed exactly the batches one process of 4 prompts x 3 seeds."""
    def seeds(one: RankLayout, epoch: int) -> list[int]:
        return [generator.initial_seed() for generator in one.noise_generators(epoch)]

    assert seeds(layout(0, 1, 4), 5) == [batch_seed(7, 5, batch) for batch in range(6)]
    assert seeds(layout(0, 2, 2), 5) + seeds(layout(1, 2, 2), 5) == seeds(layout(0, 1, 4), 5)
    assert seeds(layout(0, 1, 4), 6) != seeds(layout(0, 1, 4), 5)
