"""FID and KID between two image folders, computed by torch-fidelity.

Features are extracted once per folder with torch-fidelity's own loader and extractor (so a
subset and the union of subsets cost one pass), then torch-fidelity's FID/KID functions turn
them into the metrics: the numbers equal `torch_fidelity.calculate_metrics(input1=dir1,
input2=dir2, fid=True, kid=True, ...)` on the same folders (a test checks this).

The real metric needs the Inception weights file (`tokenflow prepare-fid` builds it offline).
A registered tiny extractor (`tokenflow-tiny-features`) exists for smoke tests only: its
numbers are labelled "NOT FID" everywhere they appear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.weights import require_weight_file

INCEPTION = "inception-v3-compat"  # torch-fidelity's registered name
TINY_EXTRACTOR = "tokenflow-tiny-features"
TINY_FEATURES = "16"
KID_MAX_SUBSET = 1000  # torch-fidelity's default subset size; smaller sets use all samples
KID_SUBSETS = 100


@dataclass(frozen=True)
class FeatureSpec:
    """Which feature extractor the distribution metrics use, and how to describe it."""

    extractor: str  # torch-fidelity registry name
    layer: str  # feature layer
    weights_path: str | None  # the weights file (Inception), None for the tiny extractor
    weights_sha256: str | None
    is_real_fid: bool  # True only for the 2015-12-05 Inception pool3 features
    label: str  # shown in tables and reports


def _tiny_extractor_class() -> type:
    class TinyFeatureExtractor(FeatureExtractorBase):
        """Two fixed random conv layers (seeded) and a global mean: 16 features per image.
        Offline and fast; it makes FID-like numbers that are NOT comparable to FID."""

        def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(1234)
            self.register_buffer("w1", torch.randn(16, 3, 3, 3, generator=g) / 3)
            self.register_buffer("w2", torch.randn(16, 16, 3, 3, generator=g) / 12)

        def forward(self, x_B3HW: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.from_normalized(x_B3HW.float() / 127.5 - 1),)

        def from_normalized(self, x_B3HW: torch.Tensor) -> torch.Tensor:
            """(B, 16) features of images already in about [-1, 1] (any size)."""
            x = F.interpolate(x_B3HW.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
            x = F.relu(F.conv2d(x, self.w1, stride=2))
            x = torch.tanh(F.conv2d(x, self.w2, stride=2))
            return x.mean(dim=(2, 3))

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return (TINY_FEATURES,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return TINY_FEATURES

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    return TinyFeatureExtractor


def register_tiny_extractor() -> str:
    """Register the tiny extractor with torch-fidelity (idempotent); returns its name."""

    if TINY_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_EXTRACTOR, _tiny_extractor_class())
    return TINY_EXTRACTOR


def inception_spec(explicit: str | Path | None = None) -> FeatureSpec:
    """The real FID extractor; MissingWeightsError (saying how to build the file) if absent."""

    path = require_weight_file("fid-inception", explicit)
    return FeatureSpec(INCEPTION, "2048", str(path), file_sha256(path), True, "Inception-v3 pool3 (FID)")


def tiny_spec() -> FeatureSpec:
    return FeatureSpec(register_tiny_extractor(), TINY_FEATURES, None, None, False,
                       f"{TINY_EXTRACTOR} (smoke test: NOT FID)")


def fidelity_kwargs(spec: FeatureSpec, cuda: bool, batch_size: int = 32) -> dict:
    """Keyword arguments shared by feature extraction and `calculate_metrics`."""
    kwargs = dict(feature_extractor=spec.extractor, feature_layer_fid=spec.layer, feature_layer_kid=spec.layer,
                  cuda=cuda, batch_size=batch_size, verbose=False, cache=False, save_cpu_ram=True,
                  samples_find_deep=False, samples_find_ext="png", kid_subsets=KID_SUBSETS)
    if spec.weights_path:
        kwargs["feature_extractor_weights_path"] = spec.weights_path
    return kwargs


class FeatureCache:
    """One torch-fidelity extractor; features of each folder computed once."""

    def __init__(self, spec: FeatureSpec, cuda: bool = False, batch_size: int = 32) -> None:
        self.spec = spec
        self.kwargs = fidelity_kwargs(spec, cuda, batch_size)
        self.extractor = create_feature_extractor(spec.extractor, [spec.layer], **self.kwargs)
        self._features: dict[str, torch.Tensor] = {}

    def features(self, folder: Path) -> torch.Tensor:
        key = str(Path(folder).resolve())
        if key not in self._features:
            found = extract_featuresdict_from_input_id(1, self.extractor, **{**self.kwargs, "input1": str(folder)})
            self._features[key] = found[self.spec.layer]
        return self._features[key]


def fid_kid(features_1: torch.Tensor, features_2: torch.Tensor, kid: bool = True, seed: int = 2020) -> dict:
    """torch-fidelity's FID (and KID over min(1000, n) subsets) from (N, D) feature rows."""

    out: dict = {"n1": int(features_1.shape[0]), "n2": int(features_2.shape[0])}
    if min(out["n1"], out["n2"]) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    stats = [fid_features_to_statistics(f) for f in (features_1, features_2)]
    out["fid"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    if kid:
        subset = min(KID_MAX_SUBSET, out["n1"], out["n2"])
        metric = kid_features_to_metric(features_1, features_2, kid_subsets=KID_SUBSETS, kid_subset_size=subset,
                                        rng_seed=seed, verbose=False)
        out.update(kid=metric["kernel_inception_distance_mean"], kid_std=metric["kernel_inception_distance_std"],
                   kid_subset_size=subset)
    return out
