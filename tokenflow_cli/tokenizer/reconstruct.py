"""Library side of `reconstruct`: images or a codes file -> PNGs and an original | recon grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenflow_cli.config import save_resolved
from tokenflow_cli.data.images import ImageLoadError, load_image, resize_center_crop
from tokenflow_cli.eval.image_metrics import psnr_uint8
from tokenflow_cli.eval.visual import grid, save_png, to_uint8
from tokenflow_cli.tokenizer.codes import list_codes_files, read_codes
from tokenflow_cli.tokenizer.pipeline import ResolvedModel, check_codes_tokenizer, iterate_batches


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
    resolved: ResolvedModel,
    paths: list[Path],
    out_dir: Path,
    batch_size: int = 16,
    strict: bool = False,
    max_grid: int = 16,
    progress=None,
) -> ReconstructResult:
    tok = resolved.tokenizer
    device = next(tok.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(tok.config, out_dir / "recipe.yaml")
    used: set[str] = set()
    originals, recons, psnrs, failures, n = [], [], [], [], 0
    for img, batch_paths, failed in iterate_batches(paths, tok.image_size, batch_size, 0, strict):
        failures.extend(failed)
        if len(batch_paths):
            rec = to_uint8(tok.codes_to_img(tok.img_to_codes(img.to(device))))
            orig = to_uint8(img)
            psnrs.append(psnr_uint8(orig, rec))
            for path, arr in zip(batch_paths, rec):
                save_png(arr, out_dir / f"{_unique_name(str(path), used)}.png")
            if sum(len(o) for o in originals) < max_grid:
                originals.append(orig)
                recons.append(rec)
            n += len(batch_paths)
        if progress:
            progress(n + len(failures), len(failures), 0.0)
    grid_path = None
    if originals:
        grid_path = out_dir / "grid.png"
        save_png(grid([np.concatenate(originals), np.concatenate(recons)], max_rows=max_grid), grid_path)
    psnr = float(np.concatenate(psnrs).mean()) if psnrs else None
    return ReconstructResult(n, grid_path, psnr, failures)


@torch.no_grad()
def reconstruct_codes_file(
    resolved: ResolvedModel, codes_path: Path, out_dir: Path, batch_size: int = 16, max_grid: int = 16, progress=None
) -> ReconstructResult:
    """Decode a codes file or a sharded codes folder; when the original images still exist, grid
    them beside the output."""

    tok = resolved.tokenizer
    device = next(tok.parameters()).device
    files = list_codes_files(codes_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(tok.config, out_dir / "recipe.yaml")
    used: set[str] = set()
    originals, recons, psnrs = [], [], []
    done = 0
    for file in files:
        codes = read_codes(file)
        check_codes_tokenizer(codes.meta, resolved, file, codes.scales)
        for start in range(0, len(codes), batch_size):
            idx = torch.from_numpy(codes.indices[start : start + batch_size].astype(np.int64)).to(device)
            rec = to_uint8(tok.codes_to_img(idx))
            batch_paths = codes.paths[start : start + batch_size]
            for path, arr in zip(batch_paths, rec):
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
