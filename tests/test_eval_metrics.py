"""PSNR/SSIM against hand computation, usage counts against brute force, quantizer views."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from tokenflow_cli.eval.image_metrics import psnr, ssim
from tokenflow_cli.tokenizer.usage import perplexity
from tokenflow_cli.tokenizer.usage_report import UsageCounts, count_codes, quantize_views


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


def test_count_codes_matches_brute_force():
    scales, K = (1, 2, 3), 7
    rng = np.random.default_rng(1)
    idx = rng.integers(0, K, (5, sum(s * s for s in scales)))
    counts = count_codes(torch.from_numpy(idx), scales, K)
    start = 0
    for si, s in enumerate(scales):
        brute = Counter(idx[:, start : start + s * s].reshape(-1).tolist())
        assert counts[si].tolist() == [brute.get(k, 0) for k in range(K)]
        start += s * s
    usage = UsageCounts(scales, K)
    usage.add("shared", torch.from_numpy(idx[:2]))
    usage.add("shared", torch.from_numpy(idx[2:]))
    summary = usage.summary()["shared"]
    all_codes = Counter(idx.reshape(-1).tolist())
    assert summary["overall"]["used"] == len(all_codes)
    assert summary["overall"]["tokens"] == idx.size
    assert [row["used"] for row in summary["per_scale"]] == [int((c > 0).sum()) for c in counts]


def test_count_codes_rejects_bad_shapes_and_values():
    with pytest.raises(ValueError):
        count_codes(torch.zeros(1, 4, dtype=torch.long), (1, 2, 3), 4)
    with pytest.raises(ValueError):
        count_codes(torch.full((1, 5), 9), (1, 2), 4)


def test_perplexity_bounds():
    assert perplexity(np.ones(16)) == pytest.approx(16)
    assert perplexity(np.array([5, 0, 0])) == pytest.approx(1)
    assert perplexity(np.zeros(3)) == 0


def test_quantize_views_shared_equals_tokenize(tiny_tokenizer):
    torch.manual_seed(0)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        views = quantize_views(tiny_tokenizer.quantizer, tiny_tokenizer.encode_features(img))
        shared = tiny_tokenizer.img_to_codes(img).indices
    assert torch.equal(views["shared"], shared)
    assert views["semantic"].shape == views["pixel"].shape == shared.shape
    # the halves really are the one-distance argmins: the first (1x1) scale checked by hand
    q = tiny_tokenizer.quantizer
    with torch.no_grad():
        f = tiny_tokenizer.encode_features(img)
        r = q.downsample(f.float(), 1).flatten(1)
        sem, pix = q.codebooks()
        d = q.cfg.semantic_dim
        z_sem = torch.nn.functional.normalize(r[:, :d], dim=-1)
        z_pix = torch.nn.functional.normalize(r[:, d:], dim=-1)
    assert torch.equal(views["semantic"][:, 0], torch.cdist(z_sem, sem).argmin(1))
    assert torch.equal(views["pixel"][:, 0], torch.cdist(z_pix, pix).argmin(1))
