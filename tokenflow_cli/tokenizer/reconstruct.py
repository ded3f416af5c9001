"""Library side of `reconstruct`: images or a codes file -> PNGs and an original | recon grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenflow_cli.config import save_resolved
from tokenflow_cli.data.images import ImageLoadError, ImageSourceError, load_image, resize_center_crop
from tokenflow_cli.eval.image_metrics import psnr_uint8
from tokenflow_cli.eval.visual import grid, save_png, to_uint8
from tokenflow_cli.tokenizer.codes import list_codes_files, read_codes
from tokenflow_cli.tokenizer.encode import encode_images
from tokenflow_cli.tokenizer.identity import check_codes_tokenizer
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer


@dataclass
class ReconstructResult:
    n_images: int
    grid_path: Path | None
    psnr: float | None  # mean PSNR (dB, on uint8 images) when originals are known
    failures: list[tuple[str, str]] = field(default_factory=list)


def _unique_name(path: str, used: set[str]) -> str:
    stem = Path(path).stem
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


def output_names(paths: list[str]) -> list[str]:
    """The PNG names reconstruction gives these inputs, in order: the input's stem, with `_1`,
    `_2`, ... appended to repeats (pairs each reconstruction with its original)."""
    used: set[str] = set()
    return [f"{_unique_name(str(path), used)}.png" for path in paths]


@torch.no_grad()
def reconstruct_images(
    tok: TokenFlowTokenizer,
    paths: list[Path],
    out_dir: Path,
    batch_size: int = 16,
    strict: bool = False,
    max_grid: int = 16,
    progress=None,
) -> ReconstructResult:
    """Encode and decode each image; writes nothing (and raises `ImageSourceError`) when none of
    the inputs is a readable image, like `tokenize`."""
    used: set[str] = set()
    originals, recons, psnrs, failures, n = [], [], [], [], 0
    for batch in encode_images(tok, paths, batch_size, strict=strict):
        failures.extend(batch.failures)
        if batch.keys:
            if n == 0:  # the first readable image: only now is anything written
                out_dir.mkdir(parents=True, exist_ok=True)
                save_resolved(tok.config, out_dir / "recipe.yaml")
            rec = to_uint8(tok.codes_to_img(batch.codes))
            orig = to_uint8(batch.images)
            psnrs.append(psnr_uint8(orig, rec))
            for path, arr in zip(batch.keys, rec):
                save_png(arr, out_dir / f"{_unique_name(str(path), used)}.png")
            if sum(len(o) for o in originals) < max_grid:
                originals.append(orig)
                recons.append(rec)
            n += len(batch.keys)
        if progress:
            progress(n + len(failures), len(failures), 0.0)
    if n == 0:
        reasons = "; ".join(f"{p}: {why}" for p, why in failures[:3])
        raise ImageSourceError(f"none of the {len(failures)} inputs is a readable image"
                               + (f" ({reasons})" if reasons else ""))
    grid_path = out_dir / "grid.png"
    save_png(grid([np.concatenate(originals), np.concatenate(recons)], max_rows=max_grid), grid_path)
    return ReconstructResult(n, grid_path, float(np.concatenate(psnrs).mean()), failures)


@torch.no_grad()
def reconstruct_codes_file(
    tok: TokenFlowTokenizer, codes_path: Path, out_dir: Path, batch_size: int = 16, max_grid: int = 16, progress=None
) -> ReconstructResult:
    """Decode a codes file or a sharded codes folder; when the original images still exist, grid
    them beside the output."""

    device = tok.device
    files = list_codes_files(codes_path)
    for file in files:  # every file is checked before anything is decoded or written
        codes = read_codes(file, tok.codebook_size)
        check_codes_tokenizer(codes.meta, tok, file, codes.scales)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(tok.config, out_dir / "recipe.yaml")
    used: set[str] = set()
    originals, recons, psnrs = [], [], []
    done = 0
    for file in files:
        codes = read_codes(file, tok.codebook_size)
        image_paths = codes.image_paths()
        for start in range(0, len(codes), batch_size):
            idx = torch.from_numpy(codes.indices[start : start + batch_size].astype(np.int64)).to(device)
            rec = to_uint8(tok.codes_to_img(idx))
            batch_paths = image_paths[start : start + batch_size]
            for path, arr in zip(batch_paths, rec, strict=True):
                save_png(arr, out_dir / f"{_unique_name(str(path), used)}.png")
            try:
                orig = np.stack([np.asarray(resize_center_crop(load_image(p), tok.image_size)) for p in batch_paths])
                psnrs.append(psnr_uint8(orig, rec))
                if sum(len(o) for o in originals) < max_grid:
                    originals.append(orig)
                    recons.append(rec)
            except (ImageLoadError, FileNotFoundError, OSError):
                if sum(len(r) for r in recons) < max_grid:
                    recons.append(rec)
            done += len(rec)
            if progress:
                progress(done, 0, 0.0)
    grid_path = out_dir / "grid.png"
    columns = (
        [np.concatenate(originals), np.concatenate(recons)]
        if originals and len(originals) == len(recons)
        else [np.concatenate(recons)]
    )
    save_png(grid(columns, max_rows=max_grid), grid_path)
    psnr = float(np.concatenate(psnrs).mean()) if psnrs and len(originals) == len(recons) else None
    return ReconstructResult(done, grid_path, psnr, [])
