"""The tokenizer's input side: what a researcher has (PIL images, uint8 arrays, float tensors,
image paths) -> one float batch (B, 3, size, size) in [-1, 1], made exactly like the official
evaluation (short side resized, centre crop, to-tensor, mean 0.5 / std 0.5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenflow_cli.data.images import from_tensor_pm1, load_image, resize_center_crop, to_tensor_pm1

# one image: a PIL image, a path, a uint8 (H, W, 3) array, or a float (3, H, W) tensor in [-1, 1]
Image1 = Image.Image | str | Path | np.ndarray | torch.Tensor
ImageInput = Image1 | Sequence[Image1]


def _resize_crop_tensor(x_B3HW: torch.Tensor, size: int) -> torch.Tensor:
    """Float images at another size: short side to `size` (bicubic, antialiased), centre crop."""
    H, W = x_B3HW.shape[-2:]
    if (H, W) == (size, size):
        return x_B3HW
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = F.interpolate(x_B3HW.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _one(image: Image1, size: int) -> torch.Tensor:
    """One image -> (3, size, size) float in [-1, 1] on the CPU."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise TypeError(f"an image array must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return to_tensor_pm1(resize_center_crop(image, size))
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
            raise TypeError(f"an image tensor must be float (3, H, W) in [-1, 1]; got {image.dtype} "
                            f"{tuple(image.shape)}")
        return _resize_crop_tensor(image[None].detach().cpu(), size)[0].float()
    raise TypeError(f"cannot read an image from {type(image).__name__}: give PIL images, paths, uint8 (H, W, 3) "
                    "arrays or float (3, H, W) tensors in [-1, 1]")


def to_batch(images: ImageInput, size: int) -> torch.Tensor:
    """Images (one, a list, a (B, H, W, 3) uint8 array or a (B, 3, H, W) float tensor) -> (B, 3,
    size, size) float in [-1, 1] on the CPU (a float tensor keeps its device)."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if not images.is_floating_point() or images.shape[1] != 3:
            raise TypeError(f"an image batch must be float (B, 3, H, W) in [-1, 1]; got {images.dtype} "
                            f"{tuple(images.shape)}")
        return _resize_crop_tensor(images, size).float()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, str, Path, np.ndarray, torch.Tensor)):
        images = [images]
    if not len(images):
        raise ValueError("no images given")
    return torch.stack([_one(image, size) for image in images])


def to_pil(img_B3HW: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> RGB PIL images (the official uint8 rounding)."""
    return [Image.fromarray(array) for array in from_tensor_pm1(img_B3HW)]
