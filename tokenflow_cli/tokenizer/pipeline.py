"""Library side of `tokenize` and `reconstruct`: model resolution, batched encoding with flat
memory, atomic outputs. Progress is reported through a callback (the CLI draws it with Rich)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenflow_cli.config import load_recipe
from tokenflow_cli.data.images import ImageDataset, ImageSourceError, collate_skip_bad
from tokenflow_cli.data.sources import FileSource, ImageSource, SourceItem, chunked, decode_batch
from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import WRITE_FAULTS, file_sha256, write_failed
from tokenflow_cli.tokenizer.codes import write_codes
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer, build_tokenizer, load_tokenizer
from tokenflow_cli.weights import DEFAULT_TOKENIZER


@dataclass
class ResolvedModel:
    tokenizer: TokenFlowTokenizer
    source: str  # a path, or a description of what was built
    random_init: bool  # True when no trained weights were found: said in every output


def resolve_tokenizer(model: str | None, device: torch.device) -> ResolvedModel:
    """An explicit checkpoint/run folder/recipe, else the default tokenizer, else a clearly
    labelled random-init tiny one."""
    if model:
        path = Path(model)
        if path.is_dir() or path.suffix == ".safetensors":
            tok = load_tokenizer(path, device)
            return ResolvedModel(tok, tok.checkpoint_path, False)
        recipe = load_recipe(model, TokenizerRecipe)  # a recipe name/file: build it untrained
        return ResolvedModel(build_tokenizer(recipe.model).to(device).eval(), f"recipe {model} (random init)", True)
    found = DEFAULT_TOKENIZER.find()
    if found is not None:
        tok = load_tokenizer(found, device)
        return ResolvedModel(tok, tok.checkpoint_path, False)
    torch.manual_seed(0)
    tok = build_tokenizer(load_recipe("tiny", TokenizerRecipe).model).to(device).eval()
    return ResolvedModel(tok, "tiny recipe, RANDOM INIT (no trained default found: run `make demo`)", True)


def tokenizer_id(resolved: ResolvedModel) -> dict:
    tok = resolved.tokenizer
    info = {"tokenizer": tok.config.name, "tokenizer_source": resolved.source, "random_init": resolved.random_init}
    if not resolved.random_init and Path(resolved.source).is_file():
        info["tokenizer_sha256"] = file_sha256(resolved.source)
    return info


class CodesTokenizerMismatch(UserError, ValueError):
    """Codes and a tokenizer that did not make them."""


def resolve_tokenizer_for_codes(meta: dict, model: str | None, device: torch.device,
                                codes_path: str | Path) -> ResolvedModel:
    """The tokenizer that made a codes file: `model` when given, else the checkpoint its metadata
    names (`tokenizer_source`); either way checked against the codes (`check_codes_tokenizer`)."""
    if model:
        resolved = resolve_tokenizer(model, device)
    elif meta.get("random_init"):  # only the same seeded stand-in decodes them
        resolved = resolve_tokenizer(None, device)
        if not resolved.random_init or resolved.source != meta.get("tokenizer_source"):
            raise CodesTokenizerMismatch(
                f"{codes_path} was made by a random-init tokenizer ({meta.get('tokenizer_source')}); "
                f"the default is now {resolved.source}: pass --model to decode them anyway")
    else:
        source = meta.get("tokenizer_source", "")
        if not source or not Path(source).is_file():
            raise CodesTokenizerMismatch(
                f"{codes_path} was made by the tokenizer {source or '(not recorded)'}, which is not there now; "
                "pass --model with that checkpoint")
        resolved = resolve_tokenizer(source, device)
    check_codes_tokenizer(meta, resolved, codes_path)
    return resolved


def check_codes_tokenizer(meta: dict, resolved: ResolvedModel, codes_path: str | Path,
                          scales: tuple[int, ...] | None = None) -> None:
    """Refuse a tokenizer whose weights (sha256), codebook size or scales differ from the one
    that made the codes; the error names both."""
    tok = resolved.tokenizer
    if scales is not None and tuple(scales) != tok.scales:
        raise CodesTokenizerMismatch(f"{codes_path} has scales {tuple(scales)}; the tokenizer {resolved.source} "
                                     f"has {tok.scales}")
    if meta.get("codebook_size", tok.codebook_size) != tok.codebook_size:
        raise CodesTokenizerMismatch(f"{codes_path} has codebook size {meta['codebook_size']}; the tokenizer "
                                     f"{resolved.source} has {tok.codebook_size}")
    expected = meta.get("tokenizer_sha256")
    if expected and not resolved.random_init and Path(resolved.source).is_file():
        actual = file_sha256(resolved.source)
        if actual != expected:
            raise CodesTokenizerMismatch(
                f"{codes_path} was made by {meta.get('tokenizer_source')} (sha256 {expected[:12]}); "
                f"{resolved.source} is a different tokenizer (sha256 {actual[:12]})")


@dataclass
class TokenizeResult:
    output: Path
    n_images: int
    n_failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    usage_share: float = 0.0  # share of the codebook hit by the whole set

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[int, int, float], None]  # (images done incl. failures, failures, usage share)


def iterate_batches(paths: list[Path], size: int, batch_size: int, workers: int, strict: bool):
    """Yield (images (B,3,H,W) in [-1,1], paths, failures [(path, reason)]) per batch."""

    dataset = ImageDataset(paths, size, train=False, strict=strict)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_bad, shuffle=False,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: non-blocking copies to a GPU
    )
    for batch in loader:
        yield batch["image"], batch["path"], list(zip(batch["skipped"], batch["errors"]))


@dataclass
class EncodedBatch:
    indices: np.ndarray  # (B, L) int32 of the decodable items (B may be 0)
    keys: list[str]  # their keys, in order
    failures: list[tuple[str, str]]  # (key, reason) of the items skipped


def encode_batches(tok: TokenFlowTokenizer, batches: Iterable[list[SourceItem]], strict: bool,
                   pool: ThreadPoolExecutor | None, hit: torch.Tensor) -> Iterator[EncodedBatch]:
    """Decode and encode each batch of items; marks the codes used in `hit` (K,) bool. The one
    encode loop of `tokenize_paths` and the sharded tokenize. One thread decodes batch n+1 (into
    pinned memory for a GPU) while the device encodes batch n, so decoding does not starve it."""
    device = next(tok.parameters()).device

    def decode(items: list[SourceItem]):
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
            yield _encoded(tok, batch, device, hit)


def _encoded(tok: TokenFlowTokenizer, batch, device: torch.device, hit: torch.Tensor) -> EncodedBatch:
    indices = np.zeros((0, tok.num_tokens), np.int32)
    if batch.images is not None:
        idx = tok.img_to_codes(batch.images.to(device, non_blocking=True)).indices
        hit[idx.reshape(-1)] = True
        indices = idx.cpu().numpy().astype(np.int32)
    return EncodedBatch(indices, batch.keys, batch.failures)


def codes_meta(resolved: ResolvedModel, failures: list[tuple[str, str]]) -> dict:
    """The metadata every codes file written by tokenize carries (docs/CODES.md)."""
    tok = resolved.tokenizer
    return {"codebook_size": tok.codebook_size, "resolution": tok.image_size, "code_dim": tok.code_dim,
            "failed": len(failures), **tokenizer_id(resolved)}


@torch.no_grad()
def tokenize_paths(
    resolved: ResolvedModel,
    paths: list[Path] | ImageSource,
    output: Path,
    batch_size: int = 16,
    workers: int = 0,
    strict: bool = False,
    progress: ProgressFn | None = None,
    extra_meta: dict | None = None,
    allow_empty: bool = False,
) -> TokenizeResult:
    """Encode images (a path list or any `ImageSource`: files, tar shards, datasets) into one
    codes file; `workers` threads decode. Indices are appended to an on-disk buffer, so memory
    stays flat however many images there are; the .npz is streamed from it and renamed into place."""
    source = paths if isinstance(paths, ImageSource) else FileSource("paths", list(paths))
    tok = resolved.tokenizer
    hit = torch.zeros(tok.codebook_size, dtype=torch.bool, device=next(tok.parameters()).device)
    kept_paths: list[str] = []
    failures: list[tuple[str, str]] = []
    start = time.perf_counter()
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    folder = Path(output).parent if Path(output).parent.exists() else None
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp, open(Path(tmp) / "indices.bin", "wb") as buffer:
            n = 0
            try:
                for batch in encode_batches(tok, chunked(source.items(), batch_size), strict, pool, hit):
                    failures.extend(batch.failures)
                    buffer.write(batch.indices.tobytes())
                    n += len(batch.keys)
                    kept_paths.extend(batch.keys)
                    if progress:
                        progress(n + len(failures), len(failures), float(hit.float().mean()))
            finally:
                if pool:
                    pool.shutdown()
            if n == 0 and not allow_empty:  # nothing written: an existing output stays as it was
                reasons = "; ".join(f"{p}: {why}" for p, why in failures[:3])
                detail = f" ({reasons})" if reasons else ""
                raise ImageSourceError(f"none of the {len(failures)} inputs is a readable image{detail}")
            buffer.flush()
            shape = (n, tok.num_tokens)
            rows = np.memmap(buffer.name, dtype=np.int32, mode="r", shape=shape) if n else np.zeros(shape, np.int32)
            write_codes(Path(output), rows, tok.scales, kept_paths, {**codes_meta(resolved, failures),
                                                                     **(extra_meta or {})})
            del rows
    except OSError as err:
        if err.errno in WRITE_FAULTS:  # the index buffer beside the output hit a full disk or a size limit
            raise write_failed(Path(output), err) from err
        raise
    return TokenizeResult(
        Path(output), n, len(failures), failures, time.perf_counter() - start, float(hit.float().mean())
    )
