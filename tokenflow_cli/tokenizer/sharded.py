"""Tokenize across processes: under torchrun, rank r encodes paths[r::W] into its own shard and
rank 0 merges the shards into the output (a single process writes the output directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.distributed as dist

from tokenflow_cli.config import save_resolved
from tokenflow_cli.data.sources import FileSource, ImageSource
from tokenflow_cli.distributed import barrier, cleanup, init_distributed
from tokenflow_cli.tokenizer.codes import merge_codes, shard_name
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.shards import ShardRunError
from tokenflow_cli.tokenizer.tokenize import tokenize_paths


def tokenize_distributed(
    tok: TokenFlowTokenizer, source: ImageSource, output: Path, batch_size: int, workers: int, strict: bool,
    progress=None,
):
    """One process: tokenize straight into `output`. Under torchrun: rank r takes paths[r::W],
    writes its shard, and rank 0 merges the shards into `output` (and removes them).
    Returns the result on rank 0 (failures and counts summed over ranks), None elsewhere."""
    device_type = tok.device.type
    info = init_distributed(device_type)
    if not info.enabled:
        result = tokenize_paths(tok, source, output, batch_size, workers, strict, progress)
        _write_recipe_beside(tok, output)
        return result
    if not isinstance(source, FileSource):
        cleanup()
        raise ShardRunError(f"{source.kind} input under torchrun: pass --shard-size N with a folder as -o")
    paths = source.paths
    shard = shard_name(output, info.rank, info.world_size)
    result = tokenize_paths(
        tok,
        paths[info.rank :: info.world_size],
        shard,
        batch_size,
        workers,
        strict,
        progress if info.is_main else None,
        allow_empty=True,  # a rank's slice may be empty; the merged result is what counts
    )
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, (result.n_images, result.failures, result.seconds))
    barrier()
    try:
        if not info.is_main:
            return None
        return _merge_on_main(tok, output, result, gathered, info.world_size)
    finally:
        # every rank leaves the group cleanly: exiting with live gloo threads can abort
        barrier()
        cleanup()


def _merge_on_main(tok: TokenFlowTokenizer, output: Path, result, gathered: list, world: int):
    shards = [shard_name(output, r, world) for r in range(world)]
    merged = merge_codes(shards, output, delete=True)
    result.output = Path(output)
    result.n_images = len(merged)
    result.failures = [f for _, fails, _ in gathered for f in fails]
    result.n_failed = len(result.failures)
    result.seconds = max(s for _, _, s in gathered)
    _write_recipe_beside(tok, output)
    K = tok.codebook_size
    result.usage_share = len(np.unique(merged.indices)) / K if len(merged) else 0.0
    return result


def _write_recipe_beside(tok: TokenFlowTokenizer, output: Path) -> None:
    """codes.npz -> codes.recipe.yaml: the tokenizer's resolved recipe next to the output."""
    save_resolved(tok.config, Path(output).with_suffix(".recipe.yaml"))
