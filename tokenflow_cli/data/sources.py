"""Where large image sets live: image files (folders, globs, list files), webdataset tar shards
and Hugging Face `datasets` (a `save_to_disk` folder, or parquet files with an image column).

Every kind is an `ImageSource`: an ordered stream of `SourceItem(key, payload)` that reads
lazily, so memory stays flat in the number of images. `payload` is a path (files) or the encoded
bytes of one image (tar members, dataset cells); `data.images.load_image` decodes either, and an
undecodable item is reported and skipped exactly like a bad file. `key` names the item in codes
files and error lines: the path, `shard.tar#<__key__>`, or `<dataset>#<row>`. Opening a source
does not import torch (only decoding does), so a command checks its input before torch loads.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from tokenflow_cli.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    ImageSourceError,
    list_images,
    load_image,
    resize_center_crop,
    to_tensor_pm1,
)

if TYPE_CHECKING:
    import torch

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class SourceItem:
    key: str  # the item's name in outputs and messages
    payload: str | bytes  # a path to open, or one image's encoded bytes
    error: str | None = None  # set when the item is known bad before decoding (reported, skipped)


class ImageSource:
    """An ordered stream of images. `count` is the number of items when known up front (None for
    tar shards, which are only counted by reading them)."""

    kind: str = "files"
    description: str = ""
    count: int | None = None

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        """Items from position `start` on (skipping as cheaply as the format allows)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What a manifest records to recognise the same input on resume."""
        return {"kind": self.kind, "source": self.description, "count": self.count}


class FileSource(ImageSource):
    kind = "files"

    def __init__(self, spec: str, paths: list[Path]) -> None:
        self.description, self.paths, self.count = spec, paths, len(paths)

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for path in self.paths[start:]:  # keyed by the absolute path: codes stay usable from any folder
            yield SourceItem(str(Path(path).absolute()), str(path))


class TarSource(ImageSource):
    """webdataset shards: local paths, globs or brace patterns (`shards-{0000..0099}.tar`). Each
    sample's first member with an image extension is the image; samples without one are reported."""

    kind = "webdataset"

    def __init__(self, spec: str, urls: list[str]) -> None:
        self.description, self.urls = spec, urls

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        return islice(self._all_items(), start, None)

    def _all_items(self) -> Iterator[SourceItem]:
        import webdataset as wds

        broken: list[SourceItem] = []

        def note(err: Exception) -> bool:  # a corrupt or truncated tar: report it, go on with the next
            url = next((a for a in reversed(err.args) if isinstance(a, str) and a in self.urls), "tar shard")
            broken.append(SourceItem(Path(url).name, b"", f"unreadable tar ({type(err).__name__}: {err.args[0]})"))
            return True

        for url in self.urls:  # tarfile reads a file cut at a member boundary as a short, valid archive
            if Path(url).stat().st_size % 512:
                yield SourceItem(Path(url).name, b"", "truncated tar (its size is not a multiple of 512 bytes)")
        dataset = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False, handler=note)
        for sample in dataset:
            yield from broken
            broken.clear()
            key = f"{Path(sample.get('__url__', '?')).name}#{sample.get('__key__', '?')}"
            image = next((sample[k] for k in sample if _is_image_field(k)), None)
            if isinstance(image, bytes):
                yield SourceItem(key, image)
            else:
                yield SourceItem(key, b"", f"no image member (has {', '.join(k for k in sample if k[:2] != '__')})")
        yield from broken

    def identity(self) -> dict:
        return {**super().identity(), "shards": [Path(u).name for u in self.urls]}


def _is_image_field(name: str) -> bool:
    return not name.startswith("__") and f".{name.rsplit('.', 1)[-1].lower()}" in IMAGE_EXTENSIONS


class DatasetSource(ImageSource):
    """A Hugging Face dataset: `save_to_disk` output (memory-mapped Arrow, random access) or
    parquet files (streamed). Images are read undecoded from the image column."""

    kind = "datasets"

    def __init__(self, spec: str, dataset, column: str, count: int | None) -> None:
        self.description, self.dataset, self.column, self.count = spec, dataset, column, count

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        rows = self.dataset.skip(start) if start and hasattr(self.dataset, "skip") else self.dataset
        for row, record in enumerate(rows, start=start):
            yield SourceItem(f"{Path(self.description).name}#{row}", _cell_bytes(record.get(self.column)))

    def identity(self) -> dict:
        return {**super().identity(), "image_column": self.column}


def _cell_bytes(cell) -> bytes:
    """An undecoded `datasets.Image` cell ({"bytes", "path"}) or a binary cell -> encoded bytes."""
    if isinstance(cell, bytes):
        return cell
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path") and Path(cell["path"]).is_file():
            return Path(cell["path"]).read_bytes()
    return b""


def _expand_tars(spec: str) -> list[str]:
    import webdataset as wds

    urls: list[str] = []
    for pattern in wds.shardlists.expand_urls(spec):
        urls.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ImageSourceError(f"tar shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing)")
    return urls


def _image_column(features, names: list[str], wanted: str | None, spec: str) -> str:
    import datasets

    if wanted:
        if wanted not in names:
            raise ImageSourceError(f"{spec} has no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    typed = [n for n in names if features is not None and isinstance(features.get(n), datasets.Image)]
    named = [n for n in names if n.lower() in IMAGE_COLUMN_NAMES]
    if typed or named:
        return (typed or named)[0]
    raise ImageSourceError(f"{spec} has no image column (columns: {', '.join(names)}); pass --image-column")


def _open_saved_dataset(path: Path, column: str | None) -> DatasetSource:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    name = _image_column(loaded.features, loaded.column_names, column, str(path))
    if isinstance(loaded.features[name], datasets.Image):
        loaded = loaded.cast_column(name, datasets.Image(decode=False))
    return DatasetSource(str(path), loaded.select_columns([name]), name, len(loaded))


def _open_parquet(spec: str, files: list[str], column: str | None) -> DatasetSource:
    import datasets
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(files[0])
    except (OSError, ValueError) as err:  # pyarrow's errors are both
        raise ImageSourceError(f"{files[0]} is not a readable parquet file: {err}") from None
    features = datasets.Features.from_arrow_schema(schema)
    name = _image_column(features, list(schema.names), column, spec)
    streamed = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    if isinstance(features.get(name), datasets.Image):
        streamed = streamed.cast_column(name, datasets.Image(decode=False))
    count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return DatasetSource(spec, streamed.select_columns([name]), name, count)


def open_source(spec: str | Path, image_column: str | None = None) -> ImageSource:
    """The image source `spec` names: `.tar` shards (paths, globs, brace patterns), a dataset
    saved with `save_to_disk`, `.parquet` files (a file, glob or folder of them), or image files
    (a folder, glob, list file or single image: `list_images`)."""
    text = str(spec)
    path = Path(text).expanduser()
    if text.endswith(TAR_SUFFIXES) or (path.is_dir() and any(path.glob("*.tar"))):
        urls = sorted(str(p.resolve()) for p in path.glob("*.tar")) if path.is_dir() else _expand_tars(text)
        return TarSource(str(path.resolve()) if path.is_dir() else text, urls)
    if path.is_dir() and any((path / marker).is_file() for marker in HF_DISK_MARKERS):
        return _open_saved_dataset(path.resolve(), image_column)
    parquet = _parquet_files(text, path)
    if parquet:
        return _open_parquet(text, parquet, image_column)
    return FileSource(str(path.resolve()) if path.exists() else text, list_images(text))


def _parquet_files(text: str, path: Path) -> list[str]:
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.parquet"))
        return found if found and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()) else []
    if text.endswith(".parquet"):
        found = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not found or not all(Path(f).is_file() for f in found):
            raise ImageSourceError(f"no parquet file at {text!r}")
        return found
    return []


# ---------------------------------------------------------------------------------------------
# Decoding


def chunked(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    """Consecutive lists of `size` items (the last may be shorter): batches, or shards."""
    block: list[SourceItem] = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


@dataclass
class DecodedBatch:
    images: torch.Tensor | None  # (B, 3, size, size) in [-1, 1]; None when every item failed
    keys: list[str]  # of the decoded images, in order
    failures: list[tuple[str, str]]  # (key, reason) of the items skipped


def _decode(item: SourceItem, size: int, strict: bool) -> torch.Tensor | tuple[str, str]:
    try:
        if item.error is not None:
            raise ImageLoadError(item.key, item.error)
        return to_tensor_pm1(resize_center_crop(load_image(item.payload, name=item.key), size))
    except ImageLoadError as err:
        if strict:
            raise
        return item.key, err.reason


def decode_batch(items: list[SourceItem], size: int, strict: bool = False,
                 pool: ThreadPoolExecutor | None = None) -> DecodedBatch:
    """Decode and centre-crop `items` (in a thread pool when given: PIL decodes outside the GIL).
    Bad items are listed in `failures` (raised with `strict`); order is kept."""
    import torch  # here, not at the top: opening a source stays torch-free (CLI start-up)

    decoded = list(pool.map(lambda it: _decode(it, size, strict), items)) if pool else [
        _decode(it, size, strict) for it in items]
    good = [(item.key, out) for item, out in zip(items, decoded) if isinstance(out, torch.Tensor)]
    failures = [out for out in decoded if not isinstance(out, torch.Tensor)]
    images = torch.stack([img for _, img in good]) if good else None
    return DecodedBatch(images, [key for key, _ in good], failures)
