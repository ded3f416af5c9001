"""Per-image reconstruction metrics on uint8 images: PSNR, SSIM and LPIPS.

All three are computed on what is saved (uint8 RGB at the evaluation resolution), so anyone can
recompute them from the PNGs.

- PSNR: 10 log10(255^2 / MSE) per image over all pixels and channels (`reconstruct.psnr_uint8`).
- SSIM: scikit-image's `structural_similarity` with the settings of Wang et al. 2004 (Gaussian
  window sigma 1.5, K1 0.01, K2 0.03, population covariances, data range 255), per RGB channel,
  averaged; one number per image.
- LPIPS: the `lpips` package's calibrated heads on a torchvision ImageNet backbone read from the
  local cache (`train.losses.build_lpips`); a random backbone only when asked, and labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenflow_cli.reconstruct import psnr_uint8

SSIM_SETTINGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, K1=0.01, K2=0.03)
SSIM_PROTOCOL = ("skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, "
                 "use_sample_covariance=False, data_range=255, K1=0.01, K2=0.03, channel_axis=-1) on RGB uint8")
PSNR_PROTOCOL = "10*log10(255^2/MSE) per image on RGB uint8, then the mean over images"


def psnr(a_BHW3: np.ndarray, b_BHW3: np.ndarray) -> np.ndarray:
    """(B,) PSNR in dB of two uint8 batches."""
    return psnr_uint8(a_BHW3, b_BHW3)


def ssim(a_BHW3: np.ndarray, b_BHW3: np.ndarray) -> np.ndarray:
    """(B,) SSIM of two uint8 batches (Wang et al. 2004 settings, channels averaged)."""
    from skimage.metrics import structural_similarity

    return np.array([structural_similarity(a, b, channel_axis=-1, **SSIM_SETTINGS) for a, b in zip(a_BHW3, b_BHW3)])


def uint8_to_pm1(x_BHW3: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (LPIPS' input range)."""
    return torch.from_numpy(np.ascontiguousarray(x_BHW3)).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class LpipsMetric:
    """LPIPS, or the reason it is not computed."""

    label: str  # e.g. "lpips-vgg" or "... (RANDOM backbone: not the LPIPS metric)"
    real_backbone: bool
    backbone_path: str | None
    module: object | None = None  # train.losses.Perceptual, None when unavailable
    unavailable: str = ""  # why LPIPS is missing from the report

    @torch.no_grad()
    def __call__(self, a_BHW3: np.ndarray, b_BHW3: np.ndarray, device: torch.device) -> np.ndarray | None:
        if self.module is None:
            return None
        self.module.module.to(device)
        return self.module(uint8_to_pm1(a_BHW3).to(device), uint8_to_pm1(b_BHW3).to(device)).cpu().numpy()


def build_lpips_metric(net: str = "vgg", allow_random_backbone: bool = False, enabled: bool = True) -> LpipsMetric:
    """LPIPS from the local backbone; when it is missing, a metric that reports why (or a
    labelled random backbone if explicitly allowed)."""
    from tokenflow_cli.train.losses import MissingLpipsBackboneError, build_lpips, lpips_backbone_path

    path = lpips_backbone_path(net)
    if not enabled:
        return LpipsMetric(f"lpips-{net}", False, None, unavailable="disabled (--no-lpips)")
    try:
        module = build_lpips(net, allow_random_backbone=allow_random_backbone)
    except MissingLpipsBackboneError:
        return LpipsMetric(f"lpips-{net}", False, None, unavailable=(
            f"not computed: the {net} ImageNet backbone {path.name} is not in {path.parent} (torchvision's cache; "
            "no wheel ships it, downloads are off); copy it there or set TORCH_HOME (see `tokenflow doctor`)"))
    real = not module.random_backbone
    return LpipsMetric(module.label, real, str(path) if real else None, module)
