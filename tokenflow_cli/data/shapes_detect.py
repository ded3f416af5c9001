"""A classical detector for the shapes world (scores GenEval-style generated images offline).

Each pixel is explained as a mix of the background and one palette colour: the colour whose
segment [background, colour] in RGB passes nearest the pixel, with the mixing weight t (the
coverage) along that segment. That treats anti-aliased edges correctly (a red/beige edge pixel
is half red, not orange). Pixels with t >= 0.5 form colour masks whose 4-connected components
are the objects. Shapes are told apart by sub-pixel (coverage-weighted) features, which stay
reliable for 10-pixel objects: the fill of the bounding box (square 1, circle pi/4, upright
triangle 1/2, star ~0.45) and, for triangle vs star, how far the centroid sits below the box
centre (1/6 of the height for a triangle, ~0.05 for a star).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage  # kept out of the light import path

from tokenflow_cli.data.shapes_scene import COLORS, SIZES

SQUARE_MIN_FILL = 0.87
CIRCLE_MIN_FILL = 0.67
TRIANGLE_MIN_DROP = 0.1
MIN_COVERAGE = 0.15  # coverage below this is background noise, not a partly covered edge pixel


def classify_shape(fill: float, centroid_drop: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle" if centroid_drop >= TRIANGLE_MIN_DROP else "star"


def estimate_background(rgb_HW3: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border (objects of this world never cover it)."""
    border = np.concatenate([rgb_HW3[0], rgb_HW3[-1], rgb_HW3[:, 0], rgb_HW3[:, -1]])
    return np.median(border, axis=0)


def palette_coverage(rgb_HW3: np.ndarray, background: np.ndarray, max_distance: float) -> np.ndarray:
    """(K, H, W) coverage of each palette colour; 0 where the pixel is off that colour's segment."""
    palette_K3 = np.array(list(COLORS.values()), dtype=np.float32)
    direction_K3 = palette_K3 - background
    offset_N3 = rgb_HW3.reshape(-1, 3) - background
    length2_K = np.maximum((direction_K3**2).sum(-1), 1e-6)
    dot_NK = offset_N3 @ direction_K3.T
    t_NK = np.clip(dot_NK / length2_K, 0.0, 1.0)
    # |o - t d|^2 expanded, so no (N, K, 3) temporary is built.
    residual2_NK = (offset_N3**2).sum(-1, keepdims=True) - 2 * t_NK * dot_NK + t_NK**2 * length2_K
    residual_NK = np.sqrt(np.maximum(residual2_NK, 0.0))
    # Each pixel belongs to at most one colour: the segment passing nearest to it.
    nearest_NK = residual_NK == residual_NK.min(-1, keepdims=True)
    coverage_NK = np.where(nearest_NK & (residual_NK <= max_distance) & (t_NK >= MIN_COVERAGE), t_NK, 0.0)
    return coverage_NK.T.reshape(len(palette_K3), *rgb_HW3.shape[:2])


def _soft_features(coverage_hw: np.ndarray) -> tuple[float, float, tuple[float, float, float, float]]:
    """Fill of the box, centroid drop below the box centre, and the sub-pixel box (x0, y0, x1, y1)."""
    area = float(coverage_hw.sum())
    cols, rows = coverage_hw.max(0), coverage_hw.max(1)
    (xs,), (ys,) = np.nonzero(cols), np.nonzero(rows)
    # Partly covered end pixels contribute their coverage: the box edge lies inside them.
    x0, x1 = xs[0] + 1 - cols[xs[0]], xs[-1] + cols[xs[-1]]
    y0, y1 = ys[0] + 1 - rows[ys[0]], ys[-1] + rows[ys[-1]]
    fill = area / max(float(cols.sum() * rows.sum()), 1e-6)
    centroid_y = float((coverage_hw.sum(1) * (np.arange(len(rows)) + 0.5)).sum()) / max(area, 1e-6)
    drop = (centroid_y - (y0 + y1) / 2) / max(float(y1 - y0), 1e-6)
    return fill, drop, (float(x0), float(y0), float(x1), float(y1))


def detect_shapes(
    image: np.ndarray | Image.Image,
    min_area_frac: float = 0.004,
    max_distance: float = 60.0,
) -> list[dict[str, Any]]:
    """Objects in an RGB image (uint8 HWC, or float in [0, 1]) of the shapes world.

    Returns dicts {"shape", "color", "size", "bbox": [x0, y0, x1, y1] (sub-pixel, in pixels),
    "center": [x, y], "area", "fill", "drop"}, in reading order. Components covering less
    than `min_area_frac` of the image are ignored; pixels further than `max_distance` (RGB
    units) from every background-to-colour segment count as background.
    """

    rgb_HW3 = np.asarray(image)[..., :3]
    rgb_HW3 = rgb_HW3 * 255.0 if rgb_HW3.dtype.kind == "f" and rgb_HW3.max() <= 1.0 else rgb_HW3
    rgb_HW3 = rgb_HW3.astype(np.float32)
    height, width = rgb_HW3.shape[:2]
    coverage_KHW = palette_coverage(rgb_HW3, estimate_background(rgb_HW3), max_distance)
    min_area = max(4.0, min_area_frac * height * width)
    size_split = 0.5 * (SIZES["small"] + SIZES["large"]) * max(height, width)
    found = []
    for color, coverage_HW in zip(COLORS, coverage_KHW, strict=True):
        components_HW, _ = ndimage.label(coverage_HW >= 0.5)  # 4-connected
        for index, box in enumerate(ndimage.find_objects(components_HW), start=1):
            # A one-pixel margin around the component takes in its partly covered edge only.
            top, left = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
            window = (slice(top, box[0].stop + 1), slice(left, box[1].stop + 1))
            core_hw = components_HW[window] == index
            soft_hw = coverage_HW[window] * ndimage.binary_dilation(core_hw)
            if soft_hw.sum() < min_area:
                continue
            fill, drop, (x0, y0, x1, y1) = _soft_features(soft_hw)
            ys, xs = np.nonzero(soft_hw)
            weights = soft_hw[ys, xs] / soft_hw.sum()
            found.append(
                {
                    "shape": classify_shape(fill, drop),
                    "color": color,
                    "size": "large" if max(x1 - x0, y1 - y0) > size_split else "small",
                    "bbox": [round(left + x0, 2), round(top + y0, 2), round(left + x1, 2), round(top + y1, 2)],
                    "center": [
                        round(left + float((xs + 0.5) @ weights), 2),
                        round(top + float((ys + 0.5) @ weights), 2),
                    ],
                    "area": round(float(soft_hw.sum()), 2),
                    "fill": round(fill, 3),
                    "drop": round(drop, 3),
                }
            )
    return sorted(found, key=lambda d: (d["center"][1] // (height / 3), d["center"][0]))
