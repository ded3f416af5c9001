"""`tokenize` / `reconstruct` take --dtype: reconstruct decodes in bf16 from the same fp32 codes
(PSNR within a fraction of a dB of fp32); tokenize in bf16 warns that indices move."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import tokenflow_cli.cli.app  # noqa: F401  (registers the commands)
from tokenflow_cli.checkpoint import save_model
from tokenflow_cli.cli.common import app
from tokenflow_cli.tokenizer.codes import read_codes

runner = CliRunner()


def test_reconstruct_in_bf16_keeps_the_codes_and_the_picture(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    save_model(tiny_tokenizer, tmp_path / "tok.safetensors", tiny_tokenizer.config)
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    args = ["--model", str(tmp_path / "tok.safetensors"), "--device", "cpu"]
    assert runner.invoke(app, ["tokenize", str(images), "-o", str(tmp_path / "c.npz"), *args]).exit_code == 0
    fp32 = runner.invoke(app, ["reconstruct", str(tmp_path / "c.npz"), "-o", str(tmp_path / "r32"), *args])
    bf16 = runner.invoke(app, ["reconstruct", str(tmp_path / "c.npz"), "-o", str(tmp_path / "r16"), *args,
                               "--dtype", "bf16"])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, bf16.output
    assert "decoders (encoders fp32: the same codes) in bf16" in " ".join(bf16.output.split())
    a = np.asarray(Image.open(tmp_path / "r32" / "0.png"), dtype=np.float64)
    b = np.asarray(Image.open(tmp_path / "r16" / "0.png"), dtype=np.float64)
    assert 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12)) > 30  # bf16 rounding only
    warned = runner.invoke(app, ["tokenize", str(images), "-o", str(tmp_path / "c16.npz"), *args, "--dtype", "bf16"])
    assert warned.exit_code == 0 and "differ from fp32 codes index for index" in " ".join(warned.output.split())
    assert read_codes(tmp_path / "c16.npz").indices.shape == read_codes(tmp_path / "c.npz").indices.shape
    bad = runner.invoke(app, ["reconstruct", str(tmp_path / "c.npz"), "-o", str(tmp_path / "x"), *args,
                              "--dtype", "fp8"])
    assert bad.exit_code == 1 and "fp8" in bad.output and not (tmp_path / "x").exists()
