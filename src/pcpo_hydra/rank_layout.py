"""Which samples of an epoch this rank draws, and the noise each of its rollout batches gets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pcpo_hydra.distributed import batch_seed


@dataclass(frozen=True)
class RankLayout:
    """This rank's share of the epoch's global sample order.

    Every rank draws the same global prompt list from the same stream and samples its own
    contiguous block of whole prompt groups, so group statistics need only a gather of rewards.
    """

    rank: int
    world: int
    prompts_per_rank: int   # rollout.prompts_per_epoch
    group_size: int
    batch_size: int         # rollout.batch_size: samples per noise generator
    seed: int
    device: torch.device

    def draw_prompts(self, prompts: Sequence[str], generator: torch.Generator) -> list[str]:
        """The whole epoch's prompt draws (`prompts_per_rank` per rank, with replacement), each `group_size` times."""
        picks = torch.randint(len(prompts), (self.prompts_per_rank * self.world,), generator=generator)
        return [prompts[int(k)] for k in picks for _ in range(self.group_size)]

    @property
    def rows(self) -> slice:
        """This rank's samples in the epoch's global order."""
        per_rank = self.prompts_per_rank * self.group_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def noise_generators(self, epoch: int) -> list[torch.Generator]:
        """One generator per rollout batch, seeded by (seed, epoch, global batch index).

        The noise of a batch then depends on where it sits in the epoch, not on which rank samples
        it: one process sampling 2N images an epoch gets the noise two ranks of N each get.
        """
        rows = self.rows
        return [torch.Generator(self.device).manual_seed(batch_seed(self.seed, epoch, start // self.batch_size))
                for start in range(rows.start, rows.stop, self.batch_size)]
