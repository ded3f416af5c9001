"""The codes file: multi-scale indices of many images in one `.npz` (format below).

Arrays: `indices` int32 (N, L) with L = sum(s*s), row-major per scale, scales concatenated
coarse to fine; `scales` int32; `paths` unicode; `meta` a JSON string (codebook size,
resolution, tokenizer id/hash, tool version). Loadable with `allow_pickle=False`.
Large runs shard as `codes-00000-of-00008.npz`; `merge_codes` joins shards.
"""

from __future__ import annotations

import json
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow_cli import __version__
from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_path
from tokenflow_cli.tokenizer.scales import ScaleLayout

SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.npz$")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip date: member timestamps carry no information
MANIFEST_NAME = "manifest.json"  # a sharded codes folder (`tokenize --shard-size`): docs/CODES.md


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
    arrays = {
        "indices": indices,
        "scales": np.asarray(scales, dtype=np.int32),
        "paths": np.asarray([str(p) for p in paths], dtype=np.str_),
        "meta": np.asarray(json.dumps(meta, sort_keys=True)),
    }
    with atomic_path(Path(path), suffix=".npz") as tmp:
        _savez_reproducible(tmp, arrays)


def _savez_reproducible(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` with fixed zip timestamps: the same codes give the same bytes (and checksum), so
    a resumed sharded run can be compared file by file with an uninterrupted one. A memmap is
    streamed into the zip by `write_array` in chunks."""
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            with archive.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


class UnreadableCodesError(UserError, ValueError):
    """A file that is not a (complete) codes file."""


@contextmanager
def _open_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as data:
            yield data
    except FileNotFoundError:
        raise UnreadableCodesError(f"codes file not found: {path}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as err:
        if isinstance(err, UnreadableCodesError):
            raise
        raise UnreadableCodesError(f"{path} is not a readable codes file (truncated or not .npz?): {err}") from None


def read_codes(path: Path, mmap: bool = False) -> CodesFile:
    with _open_npz(path) as data:
        missing = {"indices", "scales", "paths", "meta"} - set(data.files)
        if missing:
            raise UnreadableCodesError(f"{path} is not a codes file: missing {sorted(missing)}")
        scales = tuple(int(s) for s in data["scales"])
        codes = CodesFile(data["indices"], scales, data["paths"], json.loads(str(data["meta"])))
    if codes.indices.shape[1] != ScaleLayout(scales).num_tokens:
        raise UnreadableCodesError(f"{path}: indices width {codes.indices.shape[1]} does not match scales {scales}")
    return codes


def read_codes_meta(path: Path) -> dict[str, Any]:
    """A codes file's metadata alone (which tokenizer made it, ...), without reading the indices."""
    with _open_npz(path) as data:
        if "meta" not in data.files:
            raise UnreadableCodesError(f"{path} is not a codes file: no metadata")
        return json.loads(str(data["meta"]))


def find_shards(path: Path) -> list[Path]:
    """All shards belonging to `path` (codes.npz -> codes-XXXXX-of-YYYYY.npz), in rank order."""
    path = Path(path)
    shards = sorted(path.parent.glob(f"{path.stem}-?????-of-?????.npz"))
    return shards


def list_codes_files(path: str | Path) -> list[Path]:
    """The codes files `path` names: one codes file, a sharded folder (`manifest.json` and
    `codes-00000.npz ...`, in shard order), or the base name of torchrun shards
    (`codes.npz` -> `codes-00000-of-00002.npz ...`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("codes-[0-9][0-9][0-9][0-9][0-9].npz"))
        if not files:
            raise FileNotFoundError(f"no codes shards (codes-00000.npz ...) in the folder {path}")
        return files
    files = find_shards(path)
    if not files:
        raise FileNotFoundError(f"no codes file or shards at {path} (write one with `tokenflow tokenize`)")
    return files


class CodesMismatchError(UserError, ValueError):
    """Codes files that cannot be read together (other tokenizer, scales or codebook)."""


def check_compatible(first: tuple[Path, dict, tuple], other: tuple[Path, dict, tuple]) -> None:
    """Refuse to combine codes of two tokenizers (or two scale schedules / codebook sizes)."""
    (p0, m0, s0), (p1, m1, s1) = first, other
    if s1 != s0:
        raise CodesMismatchError(f"{p1} has scales {s1}, {p0} has {s0}")
    k0, k1 = m0.get("codebook_size"), m1.get("codebook_size")
    if k1 != k0:
        raise CodesMismatchError(f"{p1} has codebook size {k1}, {p0} has {k0}")
    both_hashed = m0.get("tokenizer_sha256") and m1.get("tokenizer_sha256")
    made_by = "tokenizer_sha256" if both_hashed else "tokenizer_source"  # the same weights, wherever they lie
    if m1.get(made_by) != m0.get(made_by):
        raise CodesMismatchError(f"{p1} and {p0} were made by different tokenizers "
                                 f"({m1.get('tokenizer_source')} vs {m0.get('tokenizer_source')})")


def merge_codes(shards: list[Path], out: Path, delete: bool = False) -> CodesFile:
    """Concatenate shards (same scales and codebook) into one file."""
    if not shards:
        raise ValueError("no shards to merge")
    parts = [read_codes(p) for p in shards]
    first = parts[0]
    for p, part in zip(shards, parts):
        check_compatible((shards[0], first.meta, first.scales), (p, part.meta, part.scales))
    meta = dict(first.meta)
    meta["merged_from"] = [Path(p).name for p in shards]
    indices = np.concatenate([p.indices for p in parts]) if parts else first.indices
    paths = np.concatenate([p.paths for p in parts])
    write_codes(out, indices, first.scales, paths, meta)
    if delete:
        for p in shards:
            Path(p).unlink()
    return read_codes(out)
