"""Codes know their tokenizer: reconstruct decodes with the one that made them, refuses another,
and merge refuses codes from two tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenflow_cli.cli.app  # noqa: F401  (registers the commands)
from tokenflow_cli.checkpoint import save_model
from tokenflow_cli.cli.common import app
from tokenflow_cli.tokenizer.codes import merge_codes
from tokenflow_cli.tokenizer.model import build_tokenizer

runner = CliRunner()


@pytest.fixture
def two_tokenizers(tiny_recipe, tmp_path):
    """Two tiny checkpoints with different weights (same code space)."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        tok = build_tokenizer(tiny_recipe.model).eval()
        paths.append(tmp_path / f"tok{seed}" / "model.safetensors")
        save_model(tok, paths[-1], tok.config)
    return paths


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return root


def _tokenize(images, model, out):
    res = runner.invoke(app, ["tokenize", str(images), "-o", str(out), "-m", str(model), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return out


def test_reconstruct_uses_the_tokenizer_that_made_the_codes(images, two_tokenizers, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapped paths in the output
    a, _ = two_tokenizers
    codes = _tokenize(images, a, tmp_path / "codes.npz")
    explicit = runner.invoke(app, ["reconstruct", str(codes), "-o", str(tmp_path / "r1"), "-m", str(a)])
    implied = runner.invoke(app, ["reconstruct", str(codes), "-o", str(tmp_path / "r2")])  # no --model
    assert explicit.exit_code == 0 and implied.exit_code == 0, implied.output
    assert str(a) in implied.output and "RANDOM" not in implied.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r1" / "im0.png")),
                          np.asarray(Image.open(tmp_path / "r2" / "im0.png")))


def test_reconstruct_refuses_a_different_tokenizer(images, two_tokenizers, tmp_path, cli_error):
    a, b = two_tokenizers
    codes = _tokenize(images, a, tmp_path / "codes.npz")
    res = runner.invoke(app, ["reconstruct", str(codes), "-o", str(tmp_path / "rec"), "-m", str(b)])
    cli_error(res, codes, a, b, code=1)
    assert not (tmp_path / "rec").exists()


def test_reconstruct_says_when_the_recorded_tokenizer_is_gone(images, two_tokenizers, tmp_path, cli_error):
    a, _ = two_tokenizers
    codes = _tokenize(images, a, tmp_path / "codes.npz")
    a.unlink()
    res = runner.invoke(app, ["reconstruct", str(codes), "-o", str(tmp_path / "rec")])
    cli_error(res, codes, a, "--model", code=1)


def test_merge_refuses_codes_of_two_tokenizers(images, two_tokenizers, tmp_path):
    a, b = two_tokenizers
    first = _tokenize(images, a, tmp_path / "a.npz")
    second = _tokenize(images, b, tmp_path / "b.npz")
    with pytest.raises(ValueError, match="different tokenizers"):
        merge_codes([first, second], tmp_path / "merged.npz")
    assert not (tmp_path / "merged.npz").exists()
    assert len(merge_codes([first, first], tmp_path / "same.npz")) == 6
