"""`tokenize`: images -> one codes file, with flat memory (indices go to an on-disk buffer) and an
atomic output. Progress is reported through a callback (the CLI draws it with Rich)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenflow_cli.data.images import ImageSourceError
from tokenflow_cli.data.sources import ImageSource
from tokenflow_cli.fileio import WRITE_FAULTS, scratch_folder, write_failed
from tokenflow_cli.tokenizer.codes import write_codes
from tokenflow_cli.tokenizer.encode import encode_images
from tokenflow_cli.tokenizer.identity import codes_meta
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer


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


@torch.no_grad()
def tokenize_paths(
    tok: TokenFlowTokenizer,
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
    hit = torch.zeros(tok.codebook_size, dtype=torch.bool, device=tok.device)
    kept_paths: list[str] = []
    failures: list[tuple[str, str]] = []
    start = time.perf_counter()
    try:  # the index buffer lies beside the output, named after it (a killed run's is removed next time)
        with scratch_folder(output) as tmp, open(tmp / "indices.bin", "wb") as buffer:
            n = 0
            for batch in encode_images(tok, paths, batch_size, workers, strict, hit):
                failures.extend(batch.failures)
                buffer.write(batch.indices.tobytes())
                n += len(batch.keys)
                kept_paths.extend(batch.keys)
                if progress:
                    progress(n + len(failures), len(failures), float(hit.float().mean()))
            if n == 0 and not allow_empty:  # nothing written: an existing output stays as it was
                reasons = "; ".join(f"{p}: {why}" for p, why in failures[:3])
                detail = f" ({reasons})" if reasons else ""
                raise ImageSourceError(f"none of the {len(failures)} inputs is a readable image{detail}")
            buffer.flush()
            shape = (n, tok.num_tokens)
            rows = np.memmap(buffer.name, dtype=np.int32, mode="r", shape=shape) if n else np.zeros(shape, np.int32)
            write_codes(Path(output), rows, tok.scales, kept_paths, {**codes_meta(tok, failures),
                                                                     **(extra_meta or {})})
            del rows
    except OSError as err:
        if err.errno in WRITE_FAULTS:  # the index buffer beside the output hit a full disk or a size limit
            raise write_failed(Path(output), err) from err
        raise
    return TokenizeResult(
        Path(output), n, len(failures), failures, time.perf_counter() - start, float(hit.float().mean())
    )
