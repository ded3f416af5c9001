"""`eval rfid --dtype/--compile`: the options reach the encode/decode and the report says so."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner


def _photos(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _rfid(tmp_path, *extra: str):
    from tokenflow_cli.cli.app import app

    out = tmp_path / "out"
    args = ["eval", "rfid", "--data", str(_photos(tmp_path / "photos")), "--tiny-features", "--no-lpips",
            "-o", str(out), "--device", "cpu", *extra]  # fmt: skip
    return CliRunner().invoke(app, args), out


def test_rfid_bf16_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result, out = _rfid(tmp_path, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    proto = json.loads((out / "report.json").read_text())["protocol"]
    assert proto["precision"] == "bf16"
    assert proto["inference"] == {
        "dtype": "bf16",
        "scope": "decoders",
        "compile": False,
        "channels_last": True,
        "quantizer": "fp32",
    }
    assert len(list((out / "reconstructions" / "data").glob("*.png"))) == 3


def test_rfid_unknown_dtype_is_one_error_line(tmp_path, cli_error):
    result, _ = _rfid(tmp_path, "--dtype", "fp8")
    cli_error(result, "fp8")
