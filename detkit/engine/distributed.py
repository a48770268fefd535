"""torch.distributed glue for training under ``torchrun``.

``torchrun --nproc_per_node N tools/train.py CONFIG`` sets RANK, WORLD_SIZE and
LOCAL_RANK (on several machines, ``torchrun --nnodes M ...`` on each: RANK and
WORLD_SIZE count the processes of all machines, LOCAL_RANK those of this one);
:func:`init_from_env` then starts the process group (NCCL on CUDA, gloo on CPU)
and pins each process to the GPU of its LOCAL_RANK. A single process without those
variables runs as world size 1 and never touches torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``tensor`` (on the process group's device) over the ranks; ``tensor`` itself in one
    process. Every rank must call it."""
    if not info.enabled:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
