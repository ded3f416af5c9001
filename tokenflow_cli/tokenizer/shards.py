"""Resumable sharded tokenize (`tokenize INPUT -o DIR --shard-size N`): the input's items
[i*N, (i+1)*N) become `DIR/codes-0000i.npz`, an ordinary codes file, and `DIR/manifest.json`
records the inputs, the tokenizer and every finished shard with its checksum (docs/CODES.md).

Why this is exact on resume: a shard's contents depend only on its items and the model (its
batches are always cut from the shard's first item), each shard is written atomically and
reproducibly (fixed zip timestamps), and a shard is done only when its file exists and names the
same tokenizer, position and inputs. So a resumed run skips finished shards, re-does the one that
was half written (only its temporary file existed), and ends with the same bytes as an
uninterrupted run. Under torchrun rank r takes shards r, r+W, ...; a resume may use another W.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tokenflow_cli.data.sources import ImageSource, SourceItem, chunked
from tokenflow_cli.distributed import barrier, cleanup, init_distributed
from tokenflow_cli.errors import UserError
from tokenflow_cli.tokenizer.codes import read_codes_meta, write_codes
from tokenflow_cli.tokenizer.encode import encode_batches
from tokenflow_cli.tokenizer.identity import codes_meta, tokenizer_id
from tokenflow_cli.tokenizer.manifest import (
    Manifest,
    check_same_run,
    read_manifest,
    remove_stale_temporaries,
    shard_path,
    write_manifest,
)
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.tokenize import ProgressFn


class ShardRunError(UserError, ValueError):
    """A sharded run that cannot start or continue as asked (the message says why)."""


@dataclass
class ShardRunResult:
    output: Path
    n_images: int = 0  # encoded by this run (all ranks)
    failures: list[tuple[str, str]] = field(default_factory=list)
    shards_written: int = 0
    shards_skipped: int = 0  # already finished by an earlier run
    total_shards: int = 0
    seconds: float = 0.0
    usage_share: float = 0.0  # share of the codebook hit by the shards this run wrote

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0


def keys_digest(items: list[SourceItem]) -> str:
    """Fingerprint of a shard's inputs: resuming over changed inputs is refused."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.key.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _shard_is_done(path: Path, index: int, digest: str, identity: dict, manifest: Manifest) -> bool:
    if not path.is_file():
        return False
    if not manifest.matches_checksum(index, path):  # changed since it was recorded: do it again
        return False
    try:
        meta = read_codes_meta(path)
    except (OSError, ValueError):  # not a codes file after all: do it again
        return False
    if meta.get("shard_index") != index or meta.get("tokenizer_sha256") != identity["tokenizer"].get("sha256"):
        return False
    if meta.get("input_keys_sha256") != digest:
        raise ShardRunError(f"{path} was made from other inputs than shard {index} of {identity['inputs']['source']} "
                            "now lists; the inputs changed since the run began: use a new output folder")
    return True


@torch.no_grad()
def _encode_shard(tok: TokenFlowTokenizer, index: int, items: list[SourceItem], path: Path, digest: str,
                  batch_size: int, pool: ThreadPoolExecutor | None, strict: bool,
                  hit: torch.Tensor, on_batch) -> tuple[int, list[tuple[str, str]]]:
    rows, keys, failures = [], [], []
    for batch in encode_batches(tok, chunked(items, batch_size), strict, pool, hit):  # cut from the shard's start
        rows.append(batch.indices)
        keys.extend(batch.keys)
        failures.extend(batch.failures)
        on_batch(len(batch.keys), len(batch.failures))
    meta = {**codes_meta(tok, failures), "failed_items": [list(f) for f in failures],
            "shard_index": index, "input_keys_sha256": digest}
    write_codes(path, np.concatenate(rows), tok.scales, keys, meta)
    return len(keys), failures


def run_identity(tok: TokenFlowTokenizer, source: ImageSource, shard_size: int) -> dict:
    tid = tokenizer_id(tok)
    return {
        "inputs": source.identity(),
        "tokenizer": {"source": tid["tokenizer_source"], "sha256": tid.get("tokenizer_sha256"),
                      "name": tid["tokenizer"], "random_init": tid["random_init"]},
        "shard_size": shard_size,
        "scales": list(tok.scales),
        "codebook_size": tok.codebook_size,
    }


def tokenize_to_shards(tok: TokenFlowTokenizer, source: ImageSource, out_dir: Path, shard_size: int,
                       batch_size: int = 16, workers: int = 0, strict: bool = False, resume: bool = False,
                       progress: ProgressFn | None = None) -> ShardRunResult | None:
    """Tokenize `source` into `out_dir` shard by shard; returns the result on rank 0 (None on
    other ranks). Without `resume` a folder that already holds a run is refused."""
    if shard_size < 1:
        raise ShardRunError(f"--shard-size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    identity = run_identity(tok, source, shard_size)
    info = init_distributed(tok.device.type)
    try:
        manifest = _start(out_dir, identity, resume, info.is_main)
        barrier()
        result, hit = _run_rank(tok, source, out_dir, manifest, identity, batch_size, workers, strict,
                                info.rank, info.world_size, progress if info.is_main else None)
        return _finish(out_dir, identity, result, hit, info)
    finally:
        cleanup()


def _start(out_dir: Path, identity: dict, resume: bool, is_main: bool) -> Manifest:
    existing = read_manifest(out_dir)
    if existing is not None and not resume:
        raise ShardRunError(f"{out_dir} already holds a sharded run ({len(existing.shards)} shards done): "
                            "pass --resume to continue it, or choose another output folder")
    if existing is not None:
        check_same_run(existing, identity, out_dir)
    manifest = existing or Manifest(identity=identity)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)  # what a killed run was writing: never a finished shard
        write_manifest(out_dir, manifest)
    return manifest


def _run_rank(tok, source, out_dir, manifest, identity, batch_size, workers, strict, rank, world, progress):
    hit = torch.zeros(tok.codebook_size, dtype=torch.bool, device=tok.device)
    result = ShardRunResult(out_dir)
    done = {"images": 0, "failed": 0}

    def on_batch(n_ok: int, n_bad: int) -> None:
        done["images"] += n_ok
        done["failed"] += n_bad
        if progress:
            progress(done["images"] + done["failed"], done["failed"], float(hit.float().mean()))

    start = time.perf_counter()
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        for index, items in enumerate(chunked(source.items(), manifest.identity["shard_size"])):
            result.total_shards = index + 1
            if index % world != rank:
                continue
            path, digest = shard_path(out_dir, index), keys_digest(items)
            if _shard_is_done(path, index, digest, identity, manifest):
                result.shards_skipped += 1
                on_batch(0, 0)
                continue
            n, failures = _encode_shard(tok, index, items, path, digest, batch_size, pool, strict, hit, on_batch)
            result.n_images += n
            result.failures.extend(failures)
            result.shards_written += 1
            if rank == 0:
                manifest.refresh(out_dir)
                write_manifest(out_dir, manifest)
    finally:
        if pool:
            pool.shutdown()
    result.seconds = time.perf_counter() - start
    return result, hit


def _finish(out_dir: Path, identity: dict, result: ShardRunResult, hit: torch.Tensor, info) -> ShardRunResult | None:
    if info.enabled:
        hit_count = hit.to(torch.int32)
        dist.all_reduce(hit_count)  # the codebook share hit by every rank's shards
        hit = hit_count > 0
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, (result.n_images, result.failures, result.shards_written,
                                          result.shards_skipped, result.seconds))
        barrier()
        if not info.is_main:
            return None
        result.n_images = sum(g[0] for g in gathered)
        result.failures = [f for g in gathered for f in g[1]]
        result.shards_written = sum(g[2] for g in gathered)
        result.shards_skipped = sum(g[3] for g in gathered)
        result.seconds = max(g[4] for g in gathered)
    result.usage_share = float(hit.float().mean())
    manifest = read_manifest(out_dir) or Manifest(identity=identity)
    manifest.refresh(out_dir)
    manifest.total_shards = result.total_shards
    manifest.complete = len(manifest.shards) == result.total_shards
    write_manifest(out_dir, manifest)
    return result
