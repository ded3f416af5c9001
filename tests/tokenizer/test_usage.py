"""Code usage counts against brute force, perplexity, and the quantizer's shared/semantic/pixel views
(moved from eval/test_eval_metrics.py: they test tokenizer/usage.py and tokenizer/usage_report.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tokenflow_cli.tokenizer.usage import perplexity
from tokenflow_cli.tokenizer.usage_report import UsageCounts, count_codes, quantize_views


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
