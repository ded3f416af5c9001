"""The FID trace term, tr sqrtm(sigma1 @ sigma2), from eigenvalues (eval/fid_protocols.py
`trace_sqrt_product`) against scipy's `sqrtm`, which pytorch-fid and clean-fid call, on real
Inception pool3 features (tests/data/inception_pool3_features.npz: 12 natural crops and their toy
reconstructions, cached by `tokenflow eval rfid`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

from tokenflow_cli.eval.fid_protocols import frechet_distance, trace_sqrt_product

FEATURES = Path(__file__).resolve().parents[1] / "data" / "inception_pool3_features.npz"


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    with np.load(FEATURES) as data:
        return data["reference"].astype(np.float64), data["reconstruction"].astype(np.float64)


def _scipy_trace(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)  # pytorch-fid's call
    return float(np.trace(covmean.real))


@pytest.mark.parametrize("dims", [256, 512])
def test_trace_equals_scipy_sqrtm_on_inception_features(features, dims):
    # scipy's sqrtm of the full 2048-wide product takes about a minute on two cores: a slice here,
    # the full width against the exact low-rank form below (and against sqrtm in the slow test)
    reference, reconstruction = (f[:, :dims] for f in features)
    sigma1, sigma2 = np.cov(reconstruction, rowvar=False), np.cov(reference, rowvar=False)
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(_scipy_trace(sigma1, sigma2), rel=2e-6)


def test_trace_equals_the_nuclear_norm_form_at_full_width(features):
    """With n images per side the covariances are A^T A / (n - 1) and B^T B / (n - 1) (A, B centred),
    and tr sqrt(sigma1 sigma2) is the sum of singular values of A B^T / (n - 1): an exact identity
    computed on an n x n matrix, independent of both eigendecompositions."""
    reference, reconstruction = features
    assert reference.shape[1] == 2048
    a, b = reconstruction - reconstruction.mean(0), reference - reference.mean(0)
    nuclear = np.linalg.svd(a @ b.T / (len(a) - 1), compute_uv=False).sum()
    sigma1, sigma2 = np.cov(reconstruction, rowvar=False), np.cov(reference, rowvar=False)
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(nuclear, rel=1e-6)


@pytest.mark.slow  # two 2048-wide scipy sqrtm calls: about two minutes on two shared cores
def test_frechet_distance_equals_pytorch_fids_at_full_width(features):
    pytorch_fid = pytest.importorskip("pytorch_fid.fid_score")
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in reversed(features)]
    ours, offset = frechet_distance(*stats[0], *stats[1])
    assert not offset
    assert ours == pytest.approx(pytorch_fid.calculate_frechet_distance(*stats[0], *stats[1]), rel=1e-6)


def test_an_eigendecomposition_that_fails_takes_pytorch_fids_eps_offset(monkeypatch):
    """pytorch-fid retries with 1e-6 on both diagonals when sqrtm fails; so do we when eigh does."""
    calls = []
    eigh = np.linalg.eigh

    def failing_once(matrix):
        calls.append(matrix.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return eigh(matrix)

    monkeypatch.setattr(np.linalg, "eigh", failing_once)
    sigma1, sigma2 = np.diag([1.0, 4.0, 0.0]), np.diag([4.0, 1.0, 9.0])
    fid, offset = frechet_distance(np.zeros(3), sigma1, np.ones(3), sigma2)
    assert offset and np.allclose(calls[1], sigma1 + 1e-6 * np.eye(3))
    traced = 2 * (np.sqrt(4.000001 * 1.000001) + np.sqrt(1.000001 * 4.000001) + np.sqrt(1e-6 * 9.000001))
    assert fid == pytest.approx(3 + 5 + 14 - traced, rel=1e-9)
