"""The one images -> codes loop (tokenize, sharded tokenize, reconstruct, eval usage and rFID,
generator training data): items are decoded and centre-cropped in a thread pool, encoded in
batches, and every unreadable item is reported (or raised with `strict`), never silently lost."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenflow_cli.data.sources import DecodedBatch, FileSource, ImageSource, SourceItem, chunked, decode_batch
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer


@dataclass
class EncodedBatch:
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1] on the model's device; None when B == 0
    codes: torch.Tensor  # (B, L) int64 on the model's device (B may be 0)
    keys: list[str]  # the decoded items' keys, in order
    failures: list[tuple[str, str]]  # (key, reason) of the items skipped

    @property
    def indices(self) -> np.ndarray:
        """(B, L) int32 on the CPU: what a codes file stores."""
        return self.codes.cpu().numpy().astype(np.int32)


def as_source(images: ImageSource | Sequence[str | Path]) -> ImageSource:
    """A path list as an `ImageSource` (files); a source as it is."""
    return images if isinstance(images, ImageSource) else FileSource("paths", [Path(p) for p in images])


def encode_batches(tok: TokenFlowTokenizer, batches: Iterable[list[SourceItem]], strict: bool = False,
                   pool: ThreadPoolExecutor | None = None, hit: torch.Tensor | None = None) -> Iterator[EncodedBatch]:
    """Decode and encode each batch of items; marks the codes used in `hit` (K,) bool when given.
    One thread decodes batch n+1 (into pinned memory for a GPU) while the device encodes batch n,
    so decoding does not starve it."""
    device = tok.device

    def decode(items: list[SourceItem]) -> DecodedBatch:
        batch = decode_batch(items, tok.image_size, strict, pool)
        if device.type == "cuda" and batch.images is not None:
            batch.images = batch.images.pin_memory()  # lets the copy below run without blocking
        return batch

    batches = iter(batches)
    with ThreadPoolExecutor(1) as ahead:
        items = next(batches, None)
        pending = ahead.submit(decode, items) if items is not None else None
        while pending is not None:
            batch = pending.result()
            items = next(batches, None)  # the source is read on this thread only
            pending = ahead.submit(decode, items) if items is not None else None
            yield _encoded(tok, batch, hit)


@torch.no_grad()
def _encoded(tok: TokenFlowTokenizer, batch: DecodedBatch, hit: torch.Tensor | None) -> EncodedBatch:
    images, codes = None, torch.zeros((0, tok.num_tokens), dtype=torch.long, device=tok.device)
    if batch.images is not None:
        images = batch.images.to(tok.device, non_blocking=True)
        codes = tok.img_to_codes(images).indices
        if hit is not None:
            hit[codes.reshape(-1)] = True
    return EncodedBatch(images, codes, batch.keys, batch.failures)


def encode_images(tok: TokenFlowTokenizer, images: ImageSource | Sequence[str | Path], batch_size: int = 16,
                  workers: int = 0, strict: bool = False, hit: torch.Tensor | None = None) -> Iterator[EncodedBatch]:
    """`encode_batches` over a source (or a path list) in batches of `batch_size`; `workers`
    threads decode."""
    with _decoding_pool(workers) as pool:
        yield from encode_batches(tok, chunked(as_source(images).items(), batch_size), strict, pool, hit)


def image_batches(tok: TokenFlowTokenizer, images: ImageSource | Sequence[str | Path], batch_size: int = 16,
                  workers: int = 0, strict: bool = False) -> Iterator[DecodedBatch]:
    """The same batches as `encode_images`, decoded and cropped for `tok` but not encoded (for
    measurements that run the encoder themselves, such as `eval usage`)."""
    with _decoding_pool(workers) as pool:
        for items in chunked(as_source(images).items(), batch_size):
            yield decode_batch(items, tok.image_size, strict, pool)


@contextlib.contextmanager
def _decoding_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        yield pool
    finally:
        if pool:
            pool.shutdown()
