"""Per-image reconstruction metrics on uint8 images: PSNR, SSIM and LPIPS.

All three are computed on what is saved (uint8 RGB at the evaluation resolution), so anyone can
recompute them from the PNGs.

- PSNR: 10 log10(255^2 / MSE) per image over all pixels and channels (`psnr_uint8`).
- SSIM: scikit-image's `structural_similarity` with the settings of Wang et al. 2004 (Gaussian
  window sigma 1.5, K1 0.01, K2 0.03, population covariances, data range 255), per RGB channel,
  averaged; one number per image.
- LPIPS: the `lpips` package's calibrated heads on a torchvision ImageNet backbone read from the
  local cache (`build_lpips`, also the training loss); a random backbone only when asked, and labelled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lpips
import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import nn

from tokenflow_cli import weights
from tokenflow_cli.data.images import uint8_to_pm1
from tokenflow_cli.errors import UserError

SSIM_SETTINGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, K1=0.01, K2=0.03)
SSIM_PROTOCOL = ("skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, "
                 "use_sample_covariance=False, data_range=255, K1=0.01, K2=0.03, channel_axis=-1) on RGB uint8")
PSNR_PROTOCOL = "10*log10(255^2/MSE) per image on RGB uint8, then the mean over images"


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR of (B, H, W, 3) uint8 batches, peak 255."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def psnr(a_BHW3: np.ndarray, b_BHW3: np.ndarray) -> np.ndarray:
    """(B,) PSNR in dB of two uint8 batches."""
    return psnr_uint8(a_BHW3, b_BHW3)


def ssim(a_BHW3: np.ndarray, b_BHW3: np.ndarray) -> np.ndarray:
    """(B,) SSIM of two uint8 batches (Wang et al. 2004 settings, channels averaged)."""

    return np.array([structural_similarity(a, b, channel_axis=-1, **SSIM_SETTINGS) for a, b in zip(a_BHW3, b_BHW3)])


# train.loss.lpips_net -> the weights.py registry entry of the ImageNet backbone LPIPS is
# calibrated on (its file name, environment variable and lookup order live there)
LPIPS_BACKBONES = {"vgg": "lpips-vgg", "alex": "lpips-alex"}


class MissingLpipsBackboneError(UserError, FileNotFoundError):
    """The LPIPS backbone weights are nowhere `weights.find_weight_file` looks."""


def lpips_backbone_path(net: str) -> Path:
    """The backbone file LPIPS loads: the first that exists in `weights.weight_candidates` order
    ($TOKENFLOW_LPIPS_VGG / _ALEX, $TORCH_HOME/hub/checkpoints, $TOKENFLOW_HOME/weights, ...),
    else its default location (torchvision's cache), where a copy should go."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"train.loss.lpips_net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    key = LPIPS_BACKBONES[net]
    return weights.find_weight_file(key) or weights.default_location(weights.WEIGHT_FILES[key])


@dataclass
class Perceptual:
    """An LPIPS module and what it is: `label` goes into logs so a random backbone is never
    mistaken for the real metric."""

    module: nn.Module
    label: str  # "lpips-vgg" or "lpips-vgg (RANDOM backbone: not the LPIPS metric)"
    random_backbone: bool

    def __call__(self, a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) of two [-1, 1] batches."""
        return self.module(a_B3HW.float(), b_B3HW.float()).flatten()


def build_lpips(net: str = "vgg", allow_random_backbone: bool = False) -> Perceptual:
    """LPIPS with its ImageNet backbone read from a local file (`lpips_backbone_path`), never
    downloaded.

    The lpips package ships only its calibrated linear heads; the backbone is torchvision's.
    We build lpips with a random trunk (no network access) and copy the cached weights in.
    A missing file is an error naming it, unless `allow_random_backbone` (tests) is set.
    """

    path = lpips_backbone_path(net)
    with warnings.catch_warnings():  # torchvision deprecation noise from lpips' own constructor
        warnings.simplefilter("ignore")
        module = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if path.is_file():
        _load_backbone(module.net, torch.load(path, map_location="cpu", weights_only=True))
        label, random_backbone = f"lpips-{net}", False
    elif allow_random_backbone:
        label, random_backbone = f"lpips-{net} (RANDOM backbone: not the LPIPS metric)", True
    else:
        spec = weights.WEIGHT_FILES[LPIPS_BACKBONES[net]]
        looked = ", ".join(str(p) for p in weights.weight_candidates(spec.key))
        raise MissingLpipsBackboneError(
            f"LPIPS needs the {spec.title}, {spec.filename}; downloads are off and no copy was found "
            f"(looked at {looked}). {spec.how[0].upper()}{spec.how[1:]}: put it at {path} or point "
            f"{spec.env} at it; or set train.loss.lpips_weight=0. train.loss.lpips_random_backbone=true "
            "allows a random backbone, for tests only"
        )
    module.requires_grad_(False)
    return Perceptual(module.eval(), label, random_backbone)


def _load_backbone(trunk: nn.Module, features_state: dict[str, torch.Tensor]) -> None:
    """lpips splits torchvision's `features.N` layers into `sliceK.N`: map the names back."""
    own = trunk.state_dict()
    for name in own:
        _, index, leaf = name.split(".")
        source = f"features.{index}.{leaf}"
        if source not in features_state or features_state[source].shape != own[name].shape:
            raise ValueError(f"LPIPS backbone file lacks {source} with shape {tuple(own[name].shape)}")
        own[name] = features_state[source]
    trunk.load_state_dict(own)


@dataclass
class LpipsMetric:
    """LPIPS, or the reason it is not computed."""

    label: str  # e.g. "lpips-vgg" or "... (RANDOM backbone: not the LPIPS metric)"
    real_backbone: bool
    backbone_path: str | None
    module: Perceptual | None = None  # the LPIPS network, None when unavailable
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
