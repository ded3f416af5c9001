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


CURVE_KEYS = ("loss", "nll", "psnr", "val_loss", "val_accuracy", "usage")  # panels, when present


def learning_curves(metrics_jsonl: Path, path: Path, width: int = 360, height: int = 160) -> Path | None:
    """One panel per logged quantity (train loss, eval PSNR / val loss / accuracy ...) against
    the step, from a run's metrics.jsonl; drawn without matplotlib. None when nothing to draw."""
    import json

    from PIL import ImageDraw

    rows = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    panels = []
    for key in CURVE_KEYS:
        for split in ("train", "eval"):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), int | float)]
            if len(pts) >= 2:
                panels.append((f"{split} {key}", np.asarray(pts, dtype=np.float64)))
    if not panels:
        return None
    img = Image.new("RGB", (width, height * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, 8, 16, 18
    for i, (name, pts) in enumerate(panels):
        y0 = i * height
        x, y = pts[:, 0], pts[:, 1]
        lo, hi = float(y.min()), float(y.max())
        hi = hi if hi > lo else lo + 1.0
        sx = (x - x.min()) / max(x.max() - x.min(), 1.0) * (width - left - right) + left
        sy = y0 + top + (hi - y) / (hi - lo) * (height - top - bottom)
        draw.rectangle([left, y0 + top, width - right, y0 + height - bottom], outline=(180, 180, 180))
        draw.line(list(zip(sx.tolist(), sy.tolist(), strict=True)), fill=(40, 90, 200), width=2)
        draw.text((left, y0 + 2), f"{name}: last {y[-1]:.4g}", fill=(0, 0, 0))
        draw.text((2, y0 + top), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((2, y0 + height - bottom - 10), f"{lo:.3g}", fill=(90, 90, 90))
        draw.text((left, y0 + height - bottom + 2), f"step {int(x.min())}", fill=(90, 90, 90))
        draw.text((width - right - 70, y0 + height - bottom + 2), f"step {int(x.max())}", fill=(90, 90, 90))
    with atomic_path(Path(path), suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
