"""torchrun support: process-group setup (gloo on CPU, nccl on GPU) and rank helpers. No
home-made distribution: the features that run across processes use these (tokenizer/sharded.py,
train/parallel.py)."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
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


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Initialise from torchrun's environment; a single process gets a no-op DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(cleanup)  # every command leaves the group cleanly, even on an early return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
