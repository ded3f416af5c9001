import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import tokenflow_cli.cli.app  # noqa: F401  (registers the commands)
from tokenflow_cli.checkpoint import save_model
from tokenflow_cli.cli.common import app
from tokenflow_cli.tokenizer.codes import read_codes

runner = CliRunner()


@pytest.fixture
def odd_folder(tmp_path):
    """Good RGB images plus every odd kind the loader must handle, and one corrupt file."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 255, (70, 64, 4), dtype=np.uint8), mode="RGBA").save(root / "sub" / "rgba.png")
    Image.new("CMYK", (64, 64), (10, 200, 30, 5)).save(root / "cmyk.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture
def tiny_checkpoint(tiny_tokenizer, tmp_path):
    path = tmp_path / "tok" / "model.safetensors"
    save_model(tiny_tokenizer, path, tiny_tokenizer.config)
    return path


def test_tokenize_skips_bad_and_handles_odd_modes(odd_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "codes.npz"
    res = runner.invoke(
        app,
        ["tokenize", str(odd_folder), "-o", str(out), "--model", str(tiny_checkpoint), "--device", "cpu", "-b", "2"],
    )
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and "skipped 1" in res.output
    codes = read_codes(out)
    assert len(codes) == 6
    assert {p.split("/")[-1] for p in codes.paths} == {
        "rgb0.png",
        "rgb1.png",
        "rgb2.png",
        "grey.png",
        "rgba.png",
        "cmyk.jpg",
    }
    assert codes.meta["failed"] == 1 and codes.meta["codebook_size"] == 1024
    assert (tmp_path / "codes.recipe.yaml").is_file()  # the resolved recipe next to the output
    assert codes.indices.shape[1] == 521


def test_tokenize_strict_fails_and_writes_nothing(odd_folder, tiny_checkpoint, tmp_path, cli_error):
    out = tmp_path / "codes.npz"
    res = runner.invoke(app, ["tokenize", str(odd_folder), "-o", str(out), "--model", str(tiny_checkpoint), "--strict"])
    assert res.exit_code != 0
    assert "--strict" in cli_error(res, "broken.png", code=1)
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_tokenize_default_model_is_labelled_random_when_untrained(odd_folder, tmp_path):
    res = runner.invoke(app, ["tokenize", str(odd_folder), "-o", str(tmp_path / "c.npz")])
    assert res.exit_code == 0, res.output
    assert "RANDOM INIT" in res.output


def test_reconstruct_images_and_codes_file(odd_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "rec"
    res = runner.invoke(app, ["reconstruct", str(odd_folder), "-o", str(out), "-m", str(tiny_checkpoint)])
    assert res.exit_code == 0, res.output
    assert (out / "grid.png").is_file() and len(list(out.glob("*.png"))) == 7
    assert "PSNR" in res.output and (out / "recipe.yaml").is_file()
    codes = tmp_path / "c.npz"
    runner.invoke(app, ["tokenize", str(odd_folder), "-o", str(codes), "-m", str(tiny_checkpoint)])
    res = runner.invoke(app, ["reconstruct", str(codes), "-o", str(tmp_path / "rec2"), "-m", str(tiny_checkpoint)])
    assert res.exit_code == 0, res.output
    a = np.asarray(Image.open(out / "rgb0.png"))
    b = np.asarray(Image.open(tmp_path / "rec2" / "rgb0.png"))
    assert np.array_equal(a, b)  # codes -> image is the same path as image -> codes -> image
    grid = Image.open(tmp_path / "rec2" / "grid.png")
    assert grid.width > 2 * 64  # originals found on disk: original | reconstruction


def test_missing_input_is_a_clear_error(tmp_path, cli_error):
    res = runner.invoke(app, ["tokenize", str(tmp_path / "nothing"), "-o", str(tmp_path / "c.npz")])
    assert res.exit_code != 0
    assert "does not exist" in cli_error(res, tmp_path / "nothing", code=1)
    assert not (tmp_path / "c.npz").exists()


def test_doctor_runs():
    res = runner.invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0 and "torch" in res.output


def test_help_does_not_import_torch():
    code = (
        "import sys, tokenflow_cli.cli.app as a; sys.argv=['tokenflow','--help'];\n"
        "try:\n    a.main()\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'LIGHT')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("LIGHT"), out.stdout[-500:] + out.stderr[-500:]
