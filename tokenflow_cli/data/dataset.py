"""The image dataset of the training loops (tokenizer, teacher): lazily loaded, augmented images
for a torch DataLoader, and the collate function that drops unreadable files. Kept apart from
data/images.py so that listing and checking images does not import torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop  # torch RNG: seeded per DataLoader worker

from tokenflow_cli.data.images import ImageLoadError, load_image, resize_center_crop, to_tensor_pm1


def _random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float]) -> Image.Image:
    top, left, height, width = RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + width, top + height))


class ImageDataset(torch.utils.data.Dataset):
    """Lazily loaded images as dicts: {"image": (3, size, size) in [-1, 1], "path", "index"}.

    Train mode: random resized crop (area range `crop_scale`; (1, 1) means resize + centre crop)
    and horizontal flip; eval mode: `resize_center_crop`. An unreadable file raises when
    `strict`, otherwise gives {"error", "path", "index"}, which `collate_skip_bad` drops and
    records, so one bad file does not stop a long DataLoader run.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        size: int,
        train: bool = False,
        crop_scale: tuple[float, float] = (0.8, 1.0),
        hflip: bool = True,
        strict: bool = False,
    ) -> None:
        # One numpy string buffer instead of a list of Path objects: forked DataLoader workers
        # touching Python objects copy their pages (refcounts), which grows memory with the list.
        self.paths = np.array([str(p) for p in paths])
        self.size = size
        self.train = train
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = hflip
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    def _transform(self, img: Image.Image) -> Image.Image:
        if not self.train or self.crop_scale[0] >= 1.0:
            img = resize_center_crop(img, self.size)
        else:
            img = _random_resized_crop(img, self.size, self.crop_scale)
        if self.train and self.hflip and torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = str(self.paths[index])
        try:
            img = load_image(path)
        except ImageLoadError as err:
            if self.strict:
                raise
            return {"error": err.reason, "path": path, "index": index}
        return {"image": to_tensor_pm1(self._transform(img)), "path": path, "index": index}


def collate_skip_bad(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch the good items; list the bad ones.

    Returns {"image": (B, 3, H, W) or None when every item failed, "path": [...],
    "index": LongTensor (B,), "skipped": [paths], "errors": [reasons]}.
    """
    good = [item for item in items if item is not None and "image" in item]
    bad = [item for item in items if item is not None and "image" not in item]
    return {
        "image": torch.stack([item["image"] for item in good]) if good else None,
        "path": [item["path"] for item in good],
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "skipped": [item["path"] for item in bad],
        "errors": [item.get("error", "unknown error") for item in bad],
    }
