"""`eval rfid` / `eval usage` end to end on a few images (tiny extractor, random tiny tokenizer),
the report's protocol fields, and the weights lookup order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture
def no_fid_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TOKENFLOW_FID_WEIGHTS", raising=False)


def test_rfid_report_protocol_and_files(photos, tmp_path, no_fid_weights):
    from tokenflow_cli.cli.app import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "rfid", "--res", "32", "--data", str(photos), "--tiny-features",
                                      "--no-lpips", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["protocols"] == ["tokenflow"]  # the paper's protocol by default
    proto = report["protocol"]
    assert proto["resolution"] == 32 and proto["model_resolution"] == 64 and proto["resized_for_model"]
    for key in ("loader", "crop", "resize", "reference", "sample", "psnr", "ssim"):
        assert proto["official_pair"][key], key
    for key in ("crop", "resize", "reconstruction", "psnr", "ssim", "lpips"):
        assert proto["our_pair"][key], key
    fid = proto["fid"]["tokenflow"]
    assert fid["is_real_fid"] is False and "NOT FID" in fid["feature_extractor"] and "pytorch-fid" in fid["reproduces"]
    assert proto["our_pair"]["lpips"]["real_backbone"] is False and proto["our_pair"]["lpips"]["unavailable"]
    assert report["counts"] == {"images": 4, "failed": 1}
    assert report["model"]["random_init"] is True
    row = report["results"]["data"]
    assert row["n"] == 4 and row["rfid"]["tokenflow"] > 0 and row["lpips"] is None and 0 < row["usage"] <= 1
    assert any("NOT FID" in w for w in report["warnings"])
    folders = {f: sorted((out / f / "data").glob("*.png")) for f in ("gts", "samples", "originals", "reconstructions")}
    assert len({tuple(p.name for p in files) for files in folders.values()}) == 1 and len(folders["gts"]) == 4
    assert Image.open(folders["reconstructions"][0]).size == (32, 32) and (out / "grid.png").is_file()
    # the reported PSNR is the PSNR of the saved files of our pair
    from tokenflow_cli.eval.image_metrics import psnr

    a = np.stack([np.asarray(Image.open(p)) for p in folders["originals"]])
    b = np.stack([np.asarray(Image.open(p)) for p in folders["reconstructions"]])
    assert row["psnr"] == pytest.approx(float(psnr(a, b).mean()))


def test_rfid_without_inception_weights_explains(photos, tmp_path, no_fid_weights, monkeypatch, cli_error):
    from tokenflow_cli.cli.app import app

    monkeypatch.setattr("tokenflow_cli.weights.fid_helper_source", lambda: None)  # nothing to build from
    result = CliRunner().invoke(app, ["eval", "rfid", "--data", str(photos), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "prepare-fid" in result.output and "--tiny-features" in result.output
    cli_error(result, "weights-inception-2015-12-05-6726825d.pth", "prepare-fid", code=1)


def test_usage_command_writes_views_and_histograms(photos, tmp_path):
    from tokenflow_cli.cli.app import app

    out = tmp_path / "usage"
    result = CliRunner().invoke(app, ["eval", "usage", str(photos), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["views"]) == {"shared", "semantic", "pixel"} and report["images"] == 4
    per_scale = report["views"]["shared"]["per_scale"]
    assert [r["tokens"] for r in per_scale] == [4 * s * s for s in report["scales"]]
    assert all((out / f"usage_{v}.png").is_file() for v in ("shared", "semantic", "pixel"))


def test_weight_lookup_order(tmp_path, monkeypatch):
    from tokenflow_cli.weights import find_weight_file, weight_report

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TOKENFLOW_FID_WEIGHTS", raising=False)
    assert find_weight_file("fid-inception") is None
    default = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    default.parent.mkdir(parents=True)
    default.write_bytes(b"x")
    assert find_weight_file("fid-inception") == default
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"y")
    monkeypatch.setenv("TOKENFLOW_FID_WEIGHTS", str(env_file))
    assert find_weight_file("fid-inception") == env_file
    explicit = tmp_path / "explicit.pth"
    assert find_weight_file("fid-inception", explicit) is None  # a missing explicit path is not skipped
    explicit.write_bytes(b"z")
    assert find_weight_file("fid-inception", explicit) == explicit
    rows = {r["name"]: r for r in weight_report()}
    assert rows["FID Inception-v3 (torch-fidelity)"]["path"] == str(env_file)
