"""Option values are checked when the command line is parsed, before any model loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import tokenflow_cli.cli.app  # noqa: F401  (registers the commands)
from tokenflow_cli.cli.common import app
from tokenflow_cli.generation.sampling import SamplingPass, parse_schedule

runner = CliRunner()


@pytest.mark.parametrize("args, named", [
    (["--p1", "3"], "--p1"),
    (["--p2", "-0.5"], "--p2"),
    (["--temperature", "0"], "--temperature"),
    (["--cfg", "-1"], "--cfg"),
    (["-n", "0"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_generate_rejects_out_of_range_values_at_parse_time(tmp_path, monkeypatch, args, named):
    monkeypatch.setenv("COLUMNS", "2000")
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", "a red fox", "-o", str(out), *args])
    assert res.exit_code == 2, res.output  # click's usage error
    assert named in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_top_p_must_be_a_probability_in_every_schedule_spelling():
    with pytest.raises(ValueError, match="top-p 3 is not a probability"):
        SamplingPass(100, 3.0)
    with pytest.raises(ValueError, match="bad pass '100:3'.*not a probability"):
        parse_schedule("1200:0.8,100:3")
    assert parse_schedule("600:0.6")[0] == SamplingPass(600, 0.6)


def test_tokenize_with_no_readable_image_fails_and_keeps_the_old_output(tmp_path, cli_error):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'broken.png'}\n{tmp_path / 'missing.png'}\n")
    out = tmp_path / "codes.npz"
    out.write_bytes(b"earlier result")
    res = runner.invoke(app, ["tokenize", str(listing), "-o", str(out), "--device", "cpu"])
    cli_error(res, "none of the 2 inputs", "broken.png", code=1)
    assert out.read_bytes() == b"earlier result"  # nothing existing overwritten


def test_tokenize_checks_the_output_before_encoding(tmp_path, cli_error):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    out = tmp_path / "blocker" / "codes.npz"
    res = runner.invoke(app, ["tokenize", str(tmp_path / "no-such-images"), "-o", str(out), "--device", "cpu"])
    cli_error(res, out, code=1)  # reported before the (missing) inputs are even listed
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cli_error(runner.invoke(app, ["tokenize", str(tmp_path), "-o", str(folder)]), folder, "is a folder", code=1)


def test_truncated_or_foreign_checkpoint_is_one_line(tmp_path, tiny_tokenizer, cli_error):
    from tokenflow_cli.checkpoint import save_model, save_weights

    good = tmp_path / "tok.safetensors"
    save_model(tiny_tokenizer, good, tiny_tokenizer.config)
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"unused: the model fails first")
    for cut in (100, good.stat().st_size // 2):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(good.read_bytes()[:cut])
        res = runner.invoke(app, ["tokenize", str(images), "-o", str(tmp_path / "c.npz"), "-m", str(truncated)])
        cli_error(res, truncated, "not a readable checkpoint", code=1)
    foreign = tmp_path / "teacher.safetensors"
    save_weights({"w": tiny_tokenizer.quantizer.semantic_codebook.weight.detach()}, foreign, {}, kind="teacher")
    res = runner.invoke(app, ["tokenize", str(images), "-o", str(tmp_path / "c.npz"), "-m", str(foreign)])
    cli_error(res, foreign, "is a teacher checkpoint", "a tokenizer checkpoint is needed", code=1)
    assert not (tmp_path / "c.npz").exists()
