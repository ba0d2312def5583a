"""Multi-GPU (or multi-process CPU) training with torch.distributed, as started by `torchrun`.

Only the hypernetwork is wrapped in DistributedDataParallel; every rank holds its own frozen
copy of the UNet. Each step's pairs are drawn identically on every rank from (seed, step) and
rank r takes pairs r, r+W, … — so ranks see different pairs, and W ranks with P pairs per step
give the same update as one process with the same P pairs (up to float summation order).
Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def wrap(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def init_world(device: str | None = None) -> World:
    """Join the process group torchrun set up (WORLD_SIZE/RANK/LOCAL_RANK), or a 1-process world.

    `device`: "cpu", "cuda" or None (cuda when available). With CUDA each rank uses
    cuda:LOCAL_RANK and NCCL; on CPU the gloo backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        log.info("rank %d/%d on %s", rank, world_size, dev)
    return World(rank, world_size, local_rank, dev)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
