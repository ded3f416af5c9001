"""The trained defaults shipped in tokenflow_cli/assets: they load offline and do their job."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tokenflow_cli

ASSETS = Path(tokenflow_cli.__file__).resolve().parent / "assets"


@pytest.mark.skipif(not (ASSETS / "tiny-tokenizer.safetensors").is_file(), reason="no shipped tokenizer")
def test_shipped_tokenizer_reconstructs_recognisably(tmp_path):
    from tokenflow_cli.data.images import load_image, to_tensor_pm1
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.eval.image_metrics import psnr_uint8
    from tokenflow_cli.eval.visual import to_uint8
    from tokenflow_cli.tokenizer.model import load_tokenizer

    tok = load_tokenizer(ASSETS / "tiny-tokenizer.safetensors")
    render_shapes_world(tmp_path, n=8, seed=4242, size=64)  # a world the tokenizer never saw
    x = torch.stack([to_tensor_pm1(load_image(p)) for p in sorted((tmp_path / "images").glob("*.png"))])
    with torch.no_grad():
        rec = tok.codes_to_img(tok.img_to_codes(x))
    psnr = psnr_uint8(to_uint8(x), to_uint8(rec))
    assert psnr.mean() > 22.0, psnr  # a random-init tokenizer gives ~10 dB: this is not noise
    assert not tok.random_init_parts


@pytest.mark.skipif(not (ASSETS / "teacher-tiny.safetensors").is_file(), reason="no shipped teacher")
def test_shipped_teacher_resolves_by_name(monkeypatch):
    import tokenflow_cli.weights as weights

    monkeypatch.setattr(weights, "ASSETS_DIR", ASSETS)
    assert weights.find_weight_file("teacher-tiny") == ASSETS / "teacher-tiny.safetensors"


@pytest.mark.skipif(not (ASSETS / "tiny-generator" / "model.safetensors").is_file(), reason="no shipped generator")
def test_shipped_generator_generates(monkeypatch):
    from tokenflow_cli.generation.pipeline import GenerationSettings, generate_images, load_generator
    from tokenflow_cli.generation.sampling import get_schedule

    loaded = load_generator(ASSETS / "tiny-generator", "cpu")
    settings = GenerationSettings(get_schedule("two-pass"), cfg=3.0, seed=0, samples_per_prompt=2)
    result = generate_images(loaded, ["a red circle"], settings)
    assert result.images.shape == (2, 64, 64, 3) and result.images.dtype == np.uint8
    assert not loaded.random_init
