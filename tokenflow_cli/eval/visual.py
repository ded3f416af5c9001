"""PNG outputs people would rather see than read: image grids and code-usage histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenflow_cli.data.images import from_tensor_pm1
from tokenflow_cli.fileio import atomic_path


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> (B, H, W, 3) uint8, the official eval's bytes (one conversion,
    `data.images.from_tensor_pm1`, shared by every output)."""

    return from_tensor_pm1(img_B3HW)


def save_png(array_HW3: np.ndarray, path: Path) -> None:
    with atomic_path(Path(path), suffix=".png") as tmp:
        Image.fromarray(array_HW3).save(tmp, format="PNG")


def grid(columns: list[np.ndarray], pad: int = 2, max_rows: int = 16) -> np.ndarray:
    """Columns of (B, H, W, 3) uint8 batches -> one image: row b shows image b of every column."""
    rows = min(max_rows, columns[0].shape[0])
    H, W = columns[0].shape[1:3]
    out = np.full((rows * (H + pad) + pad, len(columns) * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for c, col in enumerate(columns):
        for r in range(rows):
            tile = col[r]
            if tile.shape[:2] != (H, W):
                tile = np.asarray(Image.fromarray(tile).resize((W, H), Image.BICUBIC))
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            out[y : y + H, x : x + W] = tile
    return out


def tile(images: np.ndarray, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) -> a near-square mosaic."""
    B, H, W = images.shape[:3]
    ncols = max(1, min(ncols, B))
    nrows = (B + ncols - 1) // ncols
    out = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, ncols)
        out[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    return out


def usage_histogram(counts_per_scale: np.ndarray, path: Path, width: int = 800, row_height: int = 60) -> None:
    """One row per scale: code frequency sorted high to low (log scale), drawn without matplotlib."""
    counts = np.atleast_2d(counts_per_scale).astype(np.float64)
    S = counts.shape[0]
    img = np.full((S * row_height, width, 3), 255, dtype=np.uint8)
    for s in range(S):
        row = np.sort(counts[s])[::-1]
        if row.max() <= 0:
            continue
        bins = np.array_split(row, width)
        vals = np.log1p(np.array([b.mean() if len(b) else 0.0 for b in bins]))
        heights = (vals / vals.max() * (row_height - 6)).astype(int)
        y0 = (s + 1) * row_height - 2
        for x, h in enumerate(heights):
            img[y0 - h : y0, x] = (40, 90, 200)
        img[y0, :] = (0, 0, 0)
    save_png(img, path)
