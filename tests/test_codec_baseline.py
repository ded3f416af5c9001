"""The pure parts of benchmarks/codec_baseline.py: the quality search, the byte budget, the names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "codec_baseline.py"


@pytest.fixture(scope="module")
def codec_baseline():
    spec = importlib.util.spec_from_file_location("codec_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_search_returns_the_largest_quality_within_budget(codec_baseline):
    calls = []

    def encode(quality: int) -> bytes:
        calls.append(quality)
        return b"x" * (40 + 3 * quality)

    for budget in range(40, 400, 7):
        calls.clear()
        found = codec_baseline.search_quality(encode, budget)
        expected = max(q for q in range(101) if 40 + 3 * q <= budget)
        assert (found.quality, len(found.data), found.fits) == (expected, 40 + 3 * expected, True)
        assert len(calls) <= 9  # a binary search over 101 qualities, not a scan


def test_search_keeps_quality_0_and_its_real_size_when_nothing_fits(codec_baseline):
    found = codec_baseline.search_quality(lambda q: b"x" * (500 + q), 499.5)
    assert (found.quality, len(found.data), found.fits) == (0, 500, False)


@pytest.mark.parametrize("codec", ["webp", "jpeg"])
def test_real_codec_result_fits_and_one_quality_more_does_not(codec_baseline, codec):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    sizes = {q: len(codec_baseline.encode_image(image, codec, q)) for q in (0, 100)}
    budget = (sizes[0] + sizes[100]) / 2
    found = codec_baseline.search_quality(lambda q: codec_baseline.encode_image(image, codec, q), budget)
    assert found.fits and len(found.data) <= budget
    assert len(codec_baseline.encode_image(image, codec, found.quality + 1)) > budget
    assert codec_baseline.decode_image(found.data).shape == image.shape


def test_bytes_per_image_is_tokens_times_log2_k_over_8(codec_baseline):
    budget = codec_baseline.bytes_per_image((1, 2, 4), 1024)
    assert budget["tokens_per_image"] == 21
    assert budget["bytes_per_image"] == 21 * 10 / 8


def test_output_names_follow_reconstruct():
    """The benchmark pairs reconstructions with originals by reconstruct's own naming rule."""
    from tokenflow_cli.tokenizer.reconstruct import output_names

    paths = ["a/x.png", "b/x.png", "c/y.jpg", "x_1.png", "d/x.png"]
    assert output_names(paths) == ["x.png", "x_1.png", "y.png", "x_1_1.png", "x_2.png"]
