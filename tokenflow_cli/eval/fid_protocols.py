"""rFID under the field's three protocols, from PNG files on disk.

The same Inception-v3 pool3 network (the 2015-12-05 TF graph: the weights file `tokenflow
prepare-fid` builds, which torch-fidelity, pytorch-fid and clean-fid all download under their own
names) sits behind three different front ends, and they disagree by more than the differences
papers argue about:

- `tokenflow`: what the paper's numbers come from: the official `reconstruction_vq_ddp.py` writes
  `samples/` and `gts/` PNGs and runs its vendored pytorch-fid (`evaluations/vq/pytorch_fid.py`):
  PIL -> ToTensor ([0, 1] floats) -> torch bilinear resize to 299 (align_corners=False) -> 2x - 1
  -> pool3; statistics in float64 (`np.mean`, `np.cov`), scipy `sqrtm` (here: its trace from
  eigenvalues, `trace_sqrt_product`, equal to ~1e-6 relative).
- `torch-fidelity`: torch-fidelity's `calculate_metrics`: uint8 -> TF1-style bilinear resize to
  299 -> (x - 128) / 128 -> pool3; its own statistics; KID beside FID.
- `clean-fid`: the clean-fid package's "clean" mode, run by clean-fid itself
  (`cleanfid.fid.get_files_features`: its loader and its resize, PIL bicubic per channel on
  float32 without re-quantising) with our Inception as its feature extractor (clean-fid applies
  (x - 128) / 128 before its TorchScript network; so do we); statistics as `compare_folders`
  (float32 mean, `np.cov`), scipy `sqrtm` (here too from eigenvalues).

Features are computed per list of files so a long run can cache them in pieces; the smoke-test
tiny extractor stands in for the Inception network behind every front end (labelled NOT FID).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenflow_cli.eval.fid import FeatureSpec, fid_kid, fidelity_kwargs

INCEPTION_SIZE = 299
# torch-fidelity's Inception modules from the input convolution to the global pool, in order
INCEPTION_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                    "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


@dataclass(frozen=True)
class FidProtocol:
    """One way of turning two image folders into an FID, described for the report."""

    name: str
    pairs: str  # which image pair it reads: "official" (gts/samples) or "ours" (originals/reconstructions)
    reproduces: str
    resize_to_299: str
    input_range: str
    statistics: str


PROTOCOLS: dict[str, FidProtocol] = {
    "tokenflow": FidProtocol(
        "tokenflow", "official",
        "official TokenFlow tokenizer/reconstruction_vq_ddp.py + evaluations/vq/pytorch_fid.py (pytorch-fid)",
        "torch bilinear, align_corners=False, on ToTensor [0, 1] floats", "2x - 1",
        "float64 np.mean / np.cov; tr sqrtm from eigenvalues (eps 1e-6 on the diagonal if not finite)"),
    "torch-fidelity": FidProtocol(
        "torch-fidelity", "ours", "torch_fidelity.calculate_metrics (fid, kid)",
        "TF1-compatible bilinear on uint8 values", "(x - 128) / 128",
        "torch-fidelity fid_features_to_statistics / fid_statistics_to_metric; KID over min(1000, n) subsets"),
    "clean-fid": FidProtocol(
        "clean-fid", "ours", "cleanfid.fid (mode clean): get_files_features, compare_folders",
        "clean-fid make_resizer('PIL', False, 'bicubic'): per channel on float32, no re-quantisation",
        "(x - 128) / 128",
        "float32 np.mean, np.cov; tr sqrtm from eigenvalues (eps 1e-6 on the diagonal if not finite)"),
}
PROTOCOL_CHOICES = (*PROTOCOLS, "all")


def parse_protocols(choice: str) -> list[str]:
    """"all" or one name (or a comma list) -> protocol names in the canonical order."""
    names = list(PROTOCOLS) if choice == "all" else [c.strip() for c in choice.split(",") if c.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"unknown rFID protocol {unknown or choice!r}; choose from {', '.join(PROTOCOL_CHOICES)}")
    return [n for n in PROTOCOLS if n in names]


def describe(name: str) -> dict:
    return asdict(PROTOCOLS[name])


class FeatureNetwork:
    """The pool3 network (or the tiny stand-in) shared by the three front ends.

    `fidelity` is torch-fidelity's extractor (uint8 in, its own resize and scaling);
    `after_input(x)` runs the same network on images already resized and scaled to about [-1, 1].
    """

    def __init__(self, spec: FeatureSpec, device: torch.device, batch_size: int = 32) -> None:
        from torch_fidelity.utils import create_feature_extractor

        self.spec, self.device, self.batch_size = spec, device, batch_size
        kwargs = fidelity_kwargs(spec, cuda=device.type == "cuda", batch_size=batch_size)
        self.fidelity = create_feature_extractor(spec.extractor, [spec.layer], **kwargs).eval().to(device)

    @torch.no_grad()
    def after_input(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        x = x_B3HW.to(self.device, torch.float32)
        if hasattr(self.fidelity, "from_normalized"):  # the tiny smoke-test extractor
            return self.fidelity.from_normalized(x).float()
        for name in INCEPTION_LAYERS:
            x = getattr(self.fidelity, name)(x)
        return torch.flatten(x, 1).float()

    @torch.no_grad()
    def fidelity_features(self, uint8_B3HW: torch.Tensor) -> torch.Tensor:
        return self.fidelity(uint8_B3HW.to(self.device))[0].float()


def _read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, as every one of the three tools loads a PNG: PIL, convert("RGB")."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _chunks(files: Sequence[Path], size: int) -> list[Sequence[Path]]:
    return [files[i : i + size] for i in range(0, len(files), size)]


def _tokenflow_features(files: Sequence[Path], net: FeatureNetwork) -> np.ndarray:
    """pytorch-fid's InceptionV3(resize_input=True, normalize_input=True) on ToTensor images."""
    out = []
    for chunk in _chunks(files, net.batch_size):
        unit_B3HW = torch.from_numpy(np.stack([_read_rgb(p) for p in chunk])).permute(0, 3, 1, 2).float().div(255)
        x = F.interpolate(unit_B3HW.to(net.device), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        out.append(net.after_input(2 * x - 1).cpu().numpy())
    return np.concatenate(out)


def _fidelity_features(files: Sequence[Path], net: FeatureNetwork) -> np.ndarray:
    """torch-fidelity's ImagesPathDataset (PIL RGB -> uint8 CHW tensor) and its extractor."""
    out = []
    for chunk in _chunks(files, net.batch_size):
        x = torch.from_numpy(np.stack([_read_rgb(p) for p in chunk])).permute(0, 3, 1, 2).contiguous()
        out.append(net.fidelity_features(x).cpu().numpy())
    return np.concatenate(out)


def _clean_fid_features(files: Sequence[Path], net: FeatureNetwork) -> np.ndarray:
    """clean-fid's own loader and resize; our network behind its (x - 128) / 128."""
    from cleanfid.fid import get_files_features

    with warnings.catch_warnings():  # clean-fid's PIL float resize and DataLoader notices
        warnings.simplefilter("ignore")
        return get_files_features([str(p) for p in files], model=lambda x: net.after_input((x - 128) / 128),
                                  num_workers=0, batch_size=net.batch_size, device=net.device, mode="clean",
                                  verbose=False)


FEATURES: dict[str, Callable[[Sequence[Path], FeatureNetwork], np.ndarray]] = {
    "tokenflow": _tokenflow_features, "torch-fidelity": _fidelity_features, "clean-fid": _clean_fid_features,
}


def protocol_features(name: str, files: Sequence[Path], net: FeatureNetwork) -> np.ndarray:
    """(N, D) float32 features of `files` under protocol `name`."""
    if not files:
        return np.zeros((0, 0), dtype=np.float32)
    return FEATURES[name](list(files), net).astype(np.float32, copy=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 @ sigma2) of two covariance matrices (symmetric PSD), from eigenvalues.

    sigma1 @ sigma2 is similar to R sigma2 R with R = sqrtm(sigma1) (symmetric PSD), so the trace of
    its principal square root is the sum of the square roots of R sigma2 R's eigenvalues (roundoff
    negatives count as 0, as pytorch-fid keeps the real part). Two symmetric eigendecompositions
    instead of scipy's Schur-based `sqrtm` of the non-symmetric product: about 4x faster at 2048
    features and the same trace to ~1e-6 relative on Inception features (tests/eval/test_fid_trace.py).
    """
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> tuple[float, bool]:
    """pytorch-fid's (and clean-fid's, the same code) Frechet distance, with the trace of the
    covariances' geometric mean from `trace_sqrt_product`; also whether the eps offset on the
    diagonals was needed because that trace was not finite (pytorch-fid's fallback)."""
    diff = mu1 - mu2
    try:
        trace_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        trace_covmean = float("nan")
    offset_used = not np.isfinite(trace_covmean)
    if offset_used:
        offset = np.eye(sigma1.shape[0]) * eps
        trace_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean), offset_used


def protocol_fid(name: str, reference: np.ndarray, reconstruction: np.ndarray, kid: bool = True) -> dict:
    """FID (and KID under torch-fidelity) between two (N, D) feature sets, each protocol's way."""
    n1, n2 = len(reference), len(reconstruction)
    if min(n1, n2) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    if name == "torch-fidelity":
        return fid_kid(torch.from_numpy(reference), torch.from_numpy(reconstruction), kid=kid)
    if name == "tokenflow":  # pytorch-fid keeps activations in a float64 array
        reference, reconstruction = reference.astype(np.float64), reconstruction.astype(np.float64)
    stats = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (reconstruction, reference)]
    fid, offset_used = frechet_distance(*stats[0], *stats[1])
    return {"n1": n1, "n2": n2, "fid": fid, "eps_offset_used": offset_used}
