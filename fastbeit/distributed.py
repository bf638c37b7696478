"""DDP set-up from torchrun's environment (NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def cleanup(info: DistInfo, finished: bool = True) -> None:
    """Leave the process group. After a run that finished on every rank, a barrier first, with the
    GIL released while it waits, lets the group's worker threads finish and drop the collectives
    they ran: with gloo (torch 2.11 seen here), a worker thread still dropping one when DDP's
    reducer frees the group waits for the GIL that the freeing thread holds while it joins that
    worker, and the process never exits. After an error no barrier: the other ranks may never come."""
    if info.enabled and dist.is_initialized():
        try:
            if finished:
                dist.barrier()
                time.sleep(0.1)  # the workers drop what they held (they need the GIL this thread yields)
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def leaving_group_after(info: DistInfo) -> Iterator[None]:
    """Run the block, then :func:`cleanup`: with the barrier when the block finished, without it
    when it raised."""
    try:
        yield
    except BaseException:
        cleanup(info, finished=False)
        raise
    cleanup(info, finished=True)
