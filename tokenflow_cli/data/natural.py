"""Natural-image crops cut from the photos scikit-image ships (usable offline).

Train and val crops come from disjoint source photos, so an eval on "val" never sees a photo
that training crops came from. Crop i depends only on (seed, split, i).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tokenflow_cli.data.captions import write_jsonl
from tokenflow_cli.data.images import resize_center_crop, to_rgb

# skimage.data loader names (chelsea is the cat). Every one ships with scikit-image; any that a
# given install lacks (or would fetch from the network) is skipped and reported.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
# Held out by name (not by position), so the split stays disjoint when some photos are missing:
# two colour photos, a texture and a document.
VAL_PHOTOS: tuple[str, ...] = ("coffee", "rocket", "brick", "text")
SPLITS = ("train", "val")
MIN_CROP_SHARE = 0.25  # smallest crop side as a share of the photo's short side


@functools.cache
def load_photo(name: str) -> Image.Image | None:
    """One skimage.data photo as 8-bit RGB, or None when it cannot be loaded offline."""
    try:
        from skimage import data

        array = np.asarray(getattr(data, name)())
    except Exception:  # missing attribute, missing file, or a network fetch that fails offline
        return None
    if array.dtype == bool:  # horse is a binary silhouette
        array = array.astype(np.uint8) * 255
    return to_rgb(Image.fromarray(array))


def split_photos(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "val":
        return list(VAL_PHOTOS)
    return [name for name in PHOTOS if name not in VAL_PHOTOS]


@dataclass
class NaturalCropsSummary:
    out_dir: Path
    n_images: int
    split: str
    photos_used: dict[str, int]  # source photo -> number of crops
    photos_missing: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def random_crop(photo: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop, resized to size.

    The side ranges from MIN_CROP_SHARE of the photo's short side (but never below `size`, so
    crops are not upscaled unless the photo itself is smaller) to the whole short side.
    """
    short = min(photo.size)
    smallest = min(short, max(size, int(MIN_CROP_SHARE * short), 1))
    side = int(rng.integers(smallest, short + 1))
    left = int(rng.integers(0, photo.size[0] - side + 1))
    top = int(rng.integers(0, photo.size[1] - side + 1))
    return resize_center_crop(photo.crop((left, top, left + side, top + side)), size)


def natural_crops(
    out_dir: str | Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    progress: Callable[[int], None] | None = None,
) -> NaturalCropsSummary:
    """Write n crops as images/000000.png ... plus captions.jsonl ({"image", "caption", "source"}).

    Photos of the split are used in turn, so every photo contributes about n / len(photos) crops.
    """
    if n < 1 or size < 1:
        raise ValueError(f"need n >= 1 and size >= 1 (got n={n}, size={size})")
    names = split_photos(split)
    photos = {name: load_photo(name) for name in names}
    available = [name for name in names if photos[name] is not None]
    if not available:
        raise RuntimeError(f"none of the scikit-image photos for split {split!r} could be loaded: {names}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, used = [], Counter()
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        name = available[i % len(available)]
        image = f"images/{i:06d}.png"
        random_crop(photos[name], size, rng).save(out_dir / image)
        records.append({"image": image, "caption": "a photo", "source": name})
        used[name] += 1
        if progress is not None:
            progress(1)
    captions = out_dir / "captions.jsonl"
    write_jsonl(captions, records)
    missing = [name for name in names if photos[name] is None]
    return NaturalCropsSummary(out_dir, n, split, dict(used), missing, [captions])
