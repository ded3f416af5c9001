"""The codes file: multi-scale indices of many images in one `.npz` (format below).

Arrays: `indices` int32 (N, L) with L = sum(s*s), row-major per scale, scales concatenated
coarse to fine; `scales` int32; `paths` unicode; `meta` a JSON string (codebook size,
resolution, tokenizer id/hash, tool version). Loadable with `allow_pickle=False`.
Large runs shard as `codes-00000-of-00008.npz`; `merge_codes` joins shards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow_cli import __version__
from tokenflow_cli.fileio import atomic_path
from tokenflow_cli.tokenizer.scales import ScaleLayout

SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.npz$")


@dataclass
class CodesFile:
    indices: np.ndarray  # (N, L) int32
    scales: tuple[int, ...]
    paths: np.ndarray  # (N,) unicode
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.scales)

    @property
    def offsets(self) -> list[int]:
        return list(self.layout.offsets[:-1])

    def per_scale(self, k: int) -> np.ndarray:
        """View of scale k's indices as (N, s, s) (no copy)."""
        s = self.scales[k]
        return self.indices[:, self.layout.span(k)].reshape(-1, s, s)

    def scale_views(self) -> list[np.ndarray]:
        return [self.per_scale(k) for k in range(len(self.scales))]


def shard_name(path: Path, rank: int, world: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}-{rank:05d}-of-{world:05d}.npz")


def write_codes(
    path: Path,
    indices: np.ndarray,
    scales: tuple[int, ...],
    paths: list[str] | np.ndarray,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write atomically. `indices` may be a memmap: numpy streams it into the zip in chunks."""
    layout = ScaleLayout(tuple(scales))
    scales = layout.scales
    if indices.ndim != 2 or indices.shape[1] != layout.num_tokens:
        raise ValueError(f"indices shape {indices.shape} does not match scales {scales} (L={layout.num_tokens})")
    if len(paths) != indices.shape[0]:
        raise ValueError(f"{len(paths)} paths for {indices.shape[0]} rows")
    meta = {"tool": "tokenflow-cli", "tool_version": __version__, **(meta or {})}
    if indices.dtype != np.int32:
        indices = indices.astype(np.int32)
    with atomic_path(Path(path), suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            indices=indices,
            scales=np.asarray(scales, dtype=np.int32),
            paths=np.asarray([str(p) for p in paths], dtype=np.str_),
            meta=np.asarray(json.dumps(meta)),
        )


def read_codes(path: Path, mmap: bool = False) -> CodesFile:
    with np.load(path, allow_pickle=False) as data:
        missing = {"indices", "scales", "paths", "meta"} - set(data.files)
        if missing:
            raise ValueError(f"{path} is not a codes file: missing {sorted(missing)}")
        scales = tuple(int(s) for s in data["scales"])
        codes = CodesFile(data["indices"], scales, data["paths"], json.loads(str(data["meta"])))
    if codes.indices.shape[1] != ScaleLayout(scales).num_tokens:
        raise ValueError(f"{path}: indices width {codes.indices.shape[1]} does not match scales {scales}")
    return codes


def read_codes_meta(path: Path) -> dict[str, Any]:
    """A codes file's metadata alone (which tokenizer made it, ...), without reading the indices."""
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data.files:
            raise ValueError(f"{path} is not a codes file: no metadata")
        return json.loads(str(data["meta"]))


def find_shards(path: Path) -> list[Path]:
    """All shards belonging to `path` (codes.npz -> codes-XXXXX-of-YYYYY.npz), in rank order."""
    path = Path(path)
    shards = sorted(path.parent.glob(f"{path.stem}-?????-of-?????.npz"))
    return shards


def merge_codes(shards: list[Path], out: Path, delete: bool = False) -> CodesFile:
    """Concatenate shards (same scales and codebook) into one file."""
    if not shards:
        raise ValueError("no shards to merge")
    parts = [read_codes(p) for p in shards]
    first = parts[0]
    for p, part in zip(shards, parts):
        if part.scales != first.scales:
            raise ValueError(f"{p}: scales {part.scales} differ from {first.scales}")
        if part.meta.get("codebook_size") != first.meta.get("codebook_size"):
            raise ValueError(f"{p}: codebook size differs from {shards[0]}")
        if part.meta.get("tokenizer_sha256") != first.meta.get("tokenizer_sha256"):
            raise ValueError(f"{p} and {shards[0]} were made by different tokenizers "
                             f"({part.meta.get('tokenizer_source')} vs {first.meta.get('tokenizer_source')})")
    meta = dict(first.meta)
    meta["merged_from"] = [Path(p).name for p in shards]
    indices = np.concatenate([p.indices for p in parts]) if parts else first.indices
    paths = np.concatenate([p.paths for p in parts])
    write_codes(out, indices, first.scales, paths, meta)
    if delete:
        for p in shards:
            Path(p).unlink()
    return read_codes(out)
