"""Image sources, robust loading and the transforms shared by tokenize, reconstruct, training, eval.

Conventions (docs/ARCHITECTURE.md): tensors given to the tokenizer are float (3, H, W) in
[-1, 1], made exactly like the official pipeline (to-tensor, then mean 0.5 / std 0.5).
Listing and loading do not import torch (the tensor conversions import it when first called), so
a command can check its inputs and fail without torch's start-up; the training dataset is in
data/dataset.py.
"""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tokenflow_cli.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
WHITE = (255, 255, 255)


class ImageSourceError(UserError, ValueError):
    """An image source (folder, glob, list file) that yields no images or cannot be read."""


class ImageLoadError(UserError, Exception):
    """A file that is not a decodable image: missing, corrupt, truncated or of unknown format."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot load image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Sources


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _from_list_file(list_path: Path) -> list[Path]:
    # Relative entries are relative to the list's folder, so a dataset folder can be moved whole.
    base, paths = list_path.parent, []
    for line in list_path.read_text().splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            paths.append(base / entry)
    return paths


def _from_jsonl(jsonl_path: Path) -> list[Path]:
    base, paths = jsonl_path.parent, []
    for number, line in enumerate(jsonl_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            paths.append(base / record["image"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            message = f'{jsonl_path}:{number}: expected a JSON object with an "image" field ({err})'
            raise ImageSourceError(message) from err
    return paths


def list_images(source: str | Path) -> list[Path]:
    """All image paths named by `source`.

    `source` is a folder (searched recursively, sorted), a single image, a glob pattern
    (`imgs/**/*.png`), a text list (.txt/.lst, one path per line, `#` comments) or a .jsonl file
    with an "image" field; list entries are relative to the list file's folder and keep their
    order. Files named by a list are not opened here: unreadable ones fail at load time.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p))
        kind = f"folder {path} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        found, kind = _from_jsonl(path), f"list {path}"
    elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        found, kind = _from_list_file(path), f"list {path}"
    elif path.is_file():
        found, kind = [path], f"file {path}"
    else:
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
        kind = f"pattern {text!r}" if glob.has_magic(text) else f"path {text!r} (does not exist)"
    if not found:
        raise ImageSourceError(f"no images found in {kind}")
    return found


# ---------------------------------------------------------------------------------------------
# Loading


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float single-channel images to 8-bit RGB.

    16-bit data (modes I;16*, and mode I holding values in [0, 65535], which is how 16-bit PNG
    and TIFF files often arrive) is scaled by 255/65535 rather than clipped at 255. Floats in
    [0, 1] are scaled by 255; any other integer or float range is min-max stretched.
    """
    values = np.asarray(img, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif img.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode == "L" and "transparency" in img.info:
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    return img.convert("RGB")  # L, 1, P, CMYK (Adobe inversion is handled by the JPEG decoder), YCbCr


def load_image(path: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode `path` (or the encoded bytes of an image, named `name` in errors) fully and return
    an 8-bit RGB image, rotated by its EXIF orientation.

    Raises `ImageLoadError` for missing, unknown, corrupt or truncated files: the pixels are
    actually decoded here (`Image.verify` only checks headers and misses truncation).
    """
    label = name or ("<bytes>" if isinstance(path, bytes) else str(path))
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    try:
        with Image.open(source) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(label, f"too large ({err})") from err
    except FileNotFoundError as err:
        raise ImageLoadError(label, "file not found") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(label, "not an image in a format Pillow reads") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(label, f"{type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Transforms


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize the short side to `size`, then centre-crop `size` x `size` (the official eval).

    While the image is at least twice the target it is first halved with a box filter, as
    ADM/the official evaluation do: it averages away aliasing that one big bicubic step keeps.
    """
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(side // 2 for side in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(side * scale) for side in img.size), resample=resample)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor_pm1(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1]: to-tensor then (x - 0.5) / 0.5 as official."""
    hwc = np.asarray(to_rgb(img), dtype=np.uint8)
    return uint8_to_pm1(hwc[None])[0]


def uint8_to_pm1(x_BHW3: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]: the official ToTensor + Normalize(0.5, 0.5)
    arithmetic, (x / 255 - 0.5) / 0.5; the one conversion every input path uses."""
    import torch

    unit_B3HW = torch.from_numpy(np.array(x_BHW3, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(255.0)
    return (unit_B3HW - 0.5) / 0.5


def from_tensor_pm1(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in about [-1, 1] -> uint8 (H, W, 3) or (B, H, W, 3).

    Same bytes as the official evaluation: `clamp(127.5 * x + 128, 0, 255)` truncated to uint8,
    i.e. round-half-up of the usual (x + 1) * 127.5, so `from_tensor_pm1(to_tensor_pm1(im))`
    returns the original bytes exactly.
    """
    import torch

    values = (127.5 * img.detach().float().cpu() + 128.0).clamp(0, 255).to(torch.uint8)
    return values.movedim(-3, -1).numpy()
