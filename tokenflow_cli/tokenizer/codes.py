"""The codes file: multi-scale indices of many images in one `.npz` (format below).

Arrays: `indices` int32 (N, L) with L = sum(s*s), row-major per scale, scales concatenated
coarse to fine; `scales` int32; `paths` unicode (absolute image paths, or `shard.tar#key` /
`dataset#row` for other sources); `meta` a JSON string (codebook size,
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

from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_path
from tokenflow_cli.tokenizer.scales import ScaleLayout
from tokenflow_cli.version import __version__

SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.npz$")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip date: member timestamps carry no information
MANIFEST_NAME = "manifest.json"  # a sharded codes folder (`tokenize --shard-size`): docs/CODES.md


@dataclass
class CodesFile:
    indices: np.ndarray  # (N, L) int32
    scales: tuple[int, ...]
    paths: np.ndarray  # (N,) unicode: absolute image paths (older files: relative, see `image_paths`)
    meta: dict[str, Any]
    origin: Path | None = None  # the file it was read from

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

    def image_paths(self) -> list[Path]:
        """The recorded image of each row as a path to open: absolute as written; a relative one
        (files from before paths were absolute) is taken from the codes file's folder when it is
        there, else from the working directory."""
        base = self.origin.parent if self.origin is not None else None
        out = []
        for raw in self.paths:
            path = Path(str(raw))
            if not path.is_absolute() and base is not None and (base / path).exists():
                path = base / path
            out.append(path)
        return out


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
    scales = ScaleLayout(tuple(scales)).scales
    meta = {"tool": "tokenflow-cli", "tool_version": __version__, **(meta or {})}
    check_codes(CodesFile(indices, scales, np.asarray([str(p) for p in paths]), meta), path)
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


class InvalidCodesError(UnreadableCodesError):
    """A codes file whose arrays break the format: not integer indices, a shape that does not fit
    its scales, an index outside the codebook, or a `paths` list of another length."""


def check_codes(codes: CodesFile, path: str | Path, codebook_size: int | None = None) -> None:
    """The one validation of a codes file, run by every reader (`read_codes`) and writer: integer
    `indices` of shape (N, L) with L from the scale schedule, a 1-D `paths` of length N, and every
    index in [0, K), K = `codebook_size` (the decoding tokenizer's) or the file's own
    `meta["codebook_size"]`. Raises `InvalidCodesError` naming the file and the first culprit."""
    scales = np.asarray(codes.scales)
    try:
        if scales.ndim != 1 or scales.dtype.kind not in "iu":
            raise ValueError("need a 1-D list of integer sides")
        layout = ScaleLayout(tuple(int(s) for s in scales))
    except ValueError as err:
        raise InvalidCodesError(f"{path}: scales {scales.tolist()} are not a scale schedule ({err})") from None
    idx = codes.indices
    if idx.dtype.kind not in "iu":
        raise InvalidCodesError(f"{path}: indices are {idx.dtype}; a codes file holds integer indices (int32)")
    if idx.ndim != 2 or idx.shape[1] != layout.num_tokens:
        raise InvalidCodesError(f"{path}: indices have shape {tuple(idx.shape)}; scales {layout.scales} need "
                                f"(N, {layout.num_tokens})")
    paths = np.asarray(codes.paths)
    if paths.ndim != 1 or len(paths) != idx.shape[0]:
        raise InvalidCodesError(f"{path}: {paths.size} paths for {idx.shape[0]} rows of indices; each row needs "
                                "its image path")
    meta_k = codes.meta.get("codebook_size") if isinstance(codes.meta, dict) else None
    check_index_range(idx, layout, codebook_size or meta_k, path, paths)


def check_index_range(idx_NL: np.ndarray, layout: ScaleLayout, codebook_size: int | None, path: str | Path,
                      paths: np.ndarray | None = None) -> None:
    """Every index in [0, K) (only >= 0 when K is unknown); the error names the first one outside:
    its row (and image), scale and position."""
    if idx_NL.size == 0:
        return
    low, high = int(idx_NL.min()), int(idx_NL.max())
    if low >= 0 and (codebook_size is None or high < int(codebook_size)):
        return
    bad = (idx_NL < 0) | (idx_NL >= codebook_size) if codebook_size is not None else idx_NL < 0
    row, col = (int(x[0]) for x in np.nonzero(bad))
    k = next(k for k in range(len(layout)) if col < layout.offsets[k + 1])
    image = f" ({paths[row]})" if paths is not None and row < len(paths) else ""
    allowed = f"[0, {codebook_size})" if codebook_size is not None else "[0, K)"
    raise InvalidCodesError(f"{path}: index {int(idx_NL[row, col])} at row {row}{image}, scale "
                            f"{layout.scales[k]}x{layout.scales[k]} position {col - layout.offsets[k]} is outside "
                            f"the codebook {allowed}")


def read_codes(path: Path, codebook_size: int | None = None) -> CodesFile:
    """Read and validate (`check_codes`) a codes file; `codebook_size` is the K of the tokenizer
    that will decode it (default: the file's own)."""
    with _open_npz(path) as data:
        missing = {"indices", "scales", "paths", "meta"} - set(data.files)
        if missing:
            raise UnreadableCodesError(f"{path} is not a codes file: missing {sorted(missing)}")
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as err:
            raise InvalidCodesError(f"{path}: meta is not JSON ({err})") from None
        codes = CodesFile(data["indices"], tuple(np.asarray(data["scales"]).reshape(-1).tolist()), data["paths"],
                          meta if isinstance(meta, dict) else {}, Path(path))
    check_codes(codes, path, codebook_size)
    codes.scales = tuple(int(s) for s in codes.scales)
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
