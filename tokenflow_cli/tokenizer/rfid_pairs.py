"""The image pairs `eval rfid` writes, from one encode/decode of each image.

Two pairs come out of the same decoded batch:

- official (`gts/`, `samples/`): exactly what the official `reconstruction_vq_ddp.py` saves. The
  image is loaded as torchvision's ImageFolder does (PIL, convert("RGB"), no EXIF rotation),
  centre-cropped at the MODEL's resolution with ADM's `center_crop_arr`, turned into the model
  input by ToTensor + Normalize(0.5, 0.5); when the evaluation resolution differs, the input
  tensor and the decoded tensor are both resized with torch bicubic. The reference PNG is
  `uint8(clip(255 * (x + 1) / 2))`: a TRUNCATION, so about a quarter of the 8-bit values come
  back one lower than the source (63 of 256 levels); the sample PNG is
  `uint8(clamp(127.5 * y + 128, 0, 255))`. PSNR and SSIM are the official calls: skimage
  PSNR of sample/255 against the unquantised reference (data range 1) and skimage SSIM with
  `data_range=2.0` on [0, 1] images (as published: it inflates SSIM a little).
- ours (`originals/`, `reconstructions/`): the source's exact bytes centre-cropped at the
  evaluation resolution (same ADM crop); the reconstruction is the sample itself when the
  resolutions agree, else the model-resolution reconstruction resized with PIL bicubic. PSNR,
  SSIM (Wang et al. settings, data range 255) and LPIPS are computed on this pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenflow_cli.data.images import ImageLoadError, from_tensor_pm1, resize_center_crop, uint8_to_pm1
from tokenflow_cli.eval.image_metrics import LpipsMetric, psnr, ssim

OFFICIAL_LOADER = "PIL open + convert('RGB') (torchvision ImageFolder's loader; no EXIF rotation)"
OFFICIAL_CROP = "ADM center_crop_arr at the model's resolution (box-halve while >= 2x, bicubic, centre crop)"
OFFICIAL_RESIZE = "torch bicubic (F.interpolate) of the input and decoded tensors when --res differs"
OFFICIAL_REFERENCE = "uint8(clip(255 * (x + 1) / 2, 0, 255)) of the [-1, 1] input: truncation, as published"
SAMPLE_QUANTIZE = "uint8(clamp(127.5 * y + 128, 0, 255)) of the [-1, 1] decoder output"
OFFICIAL_PSNR = "skimage peak_signal_noise_ratio(sample / 255, unquantised reference), data range 1"
OFFICIAL_SSIM = "skimage structural_similarity(sample / 255, reference, data_range=2.0, channel_axis=-1)"
OURS_CROP = "ADM centre crop of the source at the evaluation resolution (exact bytes)"
OURS_RESIZE = "PIL bicubic of the reconstruction to the evaluation resolution when it differs from the model's"


def load_source(path: str | Path) -> Image.Image:
    """torchvision ImageFolder's loader; unreadable files raise ImageLoadError."""
    try:
        with open(path, "rb") as fh, Image.open(fh) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(str(path), str(err)) from err


def official_input(img: Image.Image, model_res: int) -> torch.Tensor:
    """(3, r, r) float in [-1, 1]: center_crop_arr + ToTensor + Normalize(0.5, 0.5)."""
    return uint8_to_pm1(np.asarray(resize_center_crop(img, model_res))[None])[0]


@dataclass
class PairBatch:
    """One decoded batch's two pairs and per-image metrics."""

    gts: np.ndarray  # (B, res, res, 3) uint8, official reference
    samples: np.ndarray  # (B, res, res, 3) uint8, official reconstruction
    originals: np.ndarray  # (B, res, res, 3) uint8, our reference
    reconstructions: np.ndarray  # (B, res, res, 3) uint8, our reconstruction
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,)


def official_pair(x_B3HW: torch.Tensor, decoded_B3HW: torch.Tensor, res: int) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """(gts uint8, samples uint8, unquantised reference float32 in [0, 1]) at `res`."""
    x, y = x_B3HW.float().cpu(), decoded_B3HW.float().cpu()
    if x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bicubic")
        y = F.interpolate(y, size=(res, res), mode="bicubic")
    rgb_gt = (x.permute(0, 2, 3, 1).numpy() + 1.0) / 2.0
    return np.clip(rgb_gt * 255, 0, 255).astype(np.uint8), from_tensor_pm1(y), rgb_gt


def official_psnr_ssim(samples: np.ndarray, rgb_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    restored = samples.astype(np.float32) / 255.0
    psnrs = [peak_signal_noise_ratio(r, g) for r, g in zip(restored, rgb_gt)]
    ssims = [structural_similarity(r, g, data_range=2.0, channel_axis=-1) for r, g in zip(restored, rgb_gt)]
    return np.asarray(psnrs, dtype=np.float64), np.asarray(ssims, dtype=np.float64)


def make_pairs(sources: list[Image.Image], x_B3HW: torch.Tensor, decoded_B3HW: torch.Tensor, res: int,
               lpips: LpipsMetric, device: torch.device) -> PairBatch:
    """Both pairs and every per-image metric of one batch (`x` the model input, `decoded` its output)."""
    gts, samples, rgb_gt = official_pair(x_B3HW, decoded_B3HW, res)
    if x_B3HW.shape[-1] == res:
        originals, reconstructions = from_tensor_pm1(x_B3HW), samples  # the input's exact bytes
    else:
        originals = np.stack([np.asarray(resize_center_crop(s, res)) for s in sources])
        model_res = from_tensor_pm1(decoded_B3HW.float())
        reconstructions = np.stack([np.asarray(Image.fromarray(a).resize((res, res), Image.BICUBIC))
                                    for a in model_res])
    batch = PairBatch(gts, samples, originals, reconstructions)
    batch.metrics["psnr_official"], batch.metrics["ssim_official"] = official_psnr_ssim(samples, rgb_gt)
    batch.metrics["psnr"] = psnr(originals, reconstructions)
    batch.metrics["ssim"] = ssim(originals, reconstructions)
    scores = lpips(originals, reconstructions, device)
    if scores is not None:
        batch.metrics["lpips"] = np.asarray(scores, dtype=np.float64)
    return batch
