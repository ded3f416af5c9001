"""PSNR/SSIM against hand computation (code usage and quantizer views: tokenizer/test_usage.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenflow_cli.eval.image_metrics import psnr, ssim


def test_psnr_matches_hand_computation():
    a = np.full((2, 8, 8, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[0] += 10  # MSE 100 everywhere
    b[1, :4] += 20  # MSE 400 on half the pixels -> 200
    expected = [10 * math.log10(255**2 / 100), 10 * math.log10(255**2 / 200)]
    assert psnr(a, b) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_constant_images_is_the_luminance_term():
    # constant images: zero variances, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a = np.full((1, 32, 32, 3), 100, dtype=np.uint8)
    b = np.full((1, 32, 32, 3), 120, dtype=np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)
    assert ssim(a, b)[0] == pytest.approx(expected, rel=1e-9)


def test_ssim_is_one_for_identical_and_drops_with_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a)[0] == pytest.approx(1.0)
    assert ssim(a, noisy)[0] < 0.9
