"""torchrun support: process-group setup (gloo on CPU, nccl on GPU), rank helpers, and
sharded tokenization whose shards rank 0 merges. No home-made distribution."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def tokenize_distributed(
    resolved, paths: list[Path], output: Path, batch_size: int, workers: int, strict: bool, progress=None
):
    """One process: tokenize straight into `output`. Under torchrun: rank r takes paths[r::W],
    writes its shard, and rank 0 merges the shards into `output` (and removes them).
    Returns the result on rank 0 (failures and counts summed over ranks), None elsewhere."""
    from tokenflow_cli.codes import shard_name
    from tokenflow_cli.inference import tokenize_paths

    device_type = next(resolved.tokenizer.parameters()).device.type
    info = init_distributed(device_type)
    if not info.enabled:
        result = tokenize_paths(resolved, paths, output, batch_size, workers, strict, progress)
        _write_recipe_beside(resolved, output)
        return result
    shard = shard_name(output, info.rank, info.world_size)
    result = tokenize_paths(
        resolved,
        paths[info.rank :: info.world_size],
        shard,
        batch_size,
        workers,
        strict,
        progress if info.is_main else None,
    )
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, (result.n_images, result.failures, result.seconds))
    barrier()
    try:
        if not info.is_main:
            return None
        return _merge_on_main(resolved, output, result, gathered, info.world_size)
    finally:
        # every rank leaves the group cleanly: exiting with live gloo threads can abort
        barrier()
        cleanup()


def _merge_on_main(resolved, output: Path, result, gathered: list, world: int):
    from tokenflow_cli.codes import merge_codes, shard_name

    shards = [shard_name(output, r, world) for r in range(world)]
    merged = merge_codes(shards, output, delete=True)
    result.output = Path(output)
    result.n_images = len(merged)
    result.failures = [f for _, fails, _ in gathered for f in fails]
    result.n_failed = len(result.failures)
    result.seconds = max(s for _, _, s in gathered)
    _write_recipe_beside(resolved, output)
    K = resolved.tokenizer.codebook_size
    result.usage_share = len(np.unique(merged.indices)) / K if len(merged) else 0.0
    return result


def _write_recipe_beside(resolved, output: Path) -> None:
    """codes.npz -> codes.recipe.yaml: the resolved tokenizer recipe next to the output."""
    from tokenflow_cli.config import save_resolved

    save_resolved(resolved.tokenizer.config, Path(output).with_suffix(".recipe.yaml"))
