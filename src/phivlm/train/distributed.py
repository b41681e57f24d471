"""Data-parallel set-up on torch.distributed (DDP): gloo on CPU, NCCL on GPU, launched by torchrun."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


WAIT = timedelta(hours=1)  # how long a rank waits for the others


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum a number over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)


def init(device_name: str) -> tuple[Dist, str]:
    """Join the process group when started by torchrun; returns the ranks and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        # NCCL's default 10 min is shorter than some waits (encoding a rank's share of a large uncached dataset,
        # rank 0 writing a large checkpoint)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=WAIT)
    if use_cuda:
        torch.cuda.set_device(local)
        return Dist(rank, world, local), f"cuda:{local}"
    return Dist(rank, world, local), "cpu"
