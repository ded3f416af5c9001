"""What a codes file or sharded codes folder holds (`tokenflow codes info`): images, the
tokenizer that made them, and codebook usage per scale, read one file at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenflow_cli.tokenizer.codes import check_compatible, list_codes_files, read_codes
from tokenflow_cli.tokenizer.manifest import read_manifest
from tokenflow_cli.tokenizer.usage import perplexity
from tokenflow_cli.tokenizer.usage_report import count_codes


@dataclass
class CodesSummary:
    path: Path
    files: list[Path]
    images: int
    failed: int
    scales: tuple[int, ...]
    codebook_size: int
    tokenizer: dict  # name, source, sha256, random_init
    usage: float  # share of the codebook used at least once (all scales)
    perplexity: float
    per_scale: list[dict] = field(default_factory=list)  # {scale, usage, perplexity}
    manifest: dict | None = None  # total_shards, complete, done (sharded folders)


def _tokenizer_of(meta: dict) -> dict:
    return {"name": meta.get("tokenizer"), "source": meta.get("tokenizer_source"),
            "sha256": meta.get("tokenizer_sha256"), "random_init": meta.get("random_init")}


def summarize_codes(path: str | Path) -> CodesSummary:
    files = list_codes_files(path)
    first, counts, images, failed = None, None, 0, 0
    for file in files:
        codes = read_codes(file)
        here = (file, codes.meta, codes.scales)
        if first is None:
            first = here
            counts = np.zeros((len(codes.scales), int(codes.meta["codebook_size"])), dtype=np.int64)
        check_compatible(first, here)
        counts += count_codes(codes.indices, codes.scales, counts.shape[1])
        images += len(codes)
        failed += int(codes.meta.get("failed", 0))
    _, meta, scales = first
    per_scale = [{"scale": s, "usage": float((counts[k] > 0).mean()), "perplexity": perplexity(counts[k])}
                 for k, s in enumerate(scales)]
    total = counts.sum(0)
    manifest = read_manifest(Path(path)) if Path(path).is_dir() else None
    state = None if manifest is None else {"total_shards": manifest.total_shards, "complete": manifest.complete,
                                           "done": len(manifest.shards)}
    return CodesSummary(Path(path), files, images, failed, tuple(scales), counts.shape[1], _tokenizer_of(meta),
                        float((total > 0).mean()), perplexity(total), per_scale, state)
