"""An epoch-seeded, rank-sharded sampler that can start mid-epoch (for exact resumption)."""

from __future__ import annotations

from typing import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """Indices of one epoch: a permutation fixed by ``(seed, epoch)``, padded to a multiple of
    the world size and split across ranks (as DistributedSampler), skipping the first
    ``start_batch`` batches of this rank when resuming mid-epoch."""

    def __init__(self, length: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.length, self.batch_size = length, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0
        self.per_rank = -(-length // world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        """Full batches per rank (the last partial batch is dropped, as in the original)."""
        return self.per_rank // self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        order += order[: self.per_rank * self.world_size - self.length]
        mine = order[self.rank :: self.world_size]
        return iter(mine[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size
