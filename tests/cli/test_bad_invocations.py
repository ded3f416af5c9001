"""A zoo of bad invocations driven through the real entry point (`tokenflow_cli.cli.app.main`):
each must exit non-zero with exactly one `error:` line naming the culprit, print no traceback,
leave no partial output and overwrite nothing that existed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tokenflow_cli.checkpoint import save_model, save_weights
from tokenflow_cli.cli.app import main
from tokenflow_cli.cli.common import CliState
from tokenflow_cli.config import load_recipe
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.tokenizer.codes import CodesMismatchError
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import build_tokenizer
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.tokenizer.tokenize import tokenize_paths

KEPT = b"an earlier result that must survive"


@dataclass
class World:
    root: Path
    images: Path
    tok_a: Path
    tok_b: Path
    teacher: Path
    truncated: Path
    foreign: Path
    codes_a: Path
    codes_b: Path
    kept: Path  # an existing output: must be byte-identical afterwards
    fresh: Path  # an output path that must not appear
    extra: dict = field(default_factory=dict)


def _tokenizer(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tok = build_tokenizer(load_recipe("tiny", TokenizerRecipe).model).eval()
    save_model(tok, path, tok.config, kind="tokenizer")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("zoo")
    render_shapes_world(root / "shapes", 6, seed=1, size=32)
    images = root / "shapes" / "images"
    tok_a, tok_b = _tokenizer(root / "a.safetensors", 0), _tokenizer(root / "b.safetensors", 1)
    teacher = root / "teacher.safetensors"
    save_weights({"w": torch.zeros(2)}, teacher, {"name": "t"}, kind="teacher")
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(tok_a.read_bytes()[:5000])
    foreign = root / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    codes = {}
    for name, tok in (("a", tok_a), ("b", tok_b)):
        codes[name] = root / f"codes_{name}.npz"
        tokenize_paths(resolve_tokenizer(str(tok), "cpu"), sorted(images.glob("*.png")), codes[name])
    w = World(root, images, tok_a, tok_b, teacher, truncated, foreign, codes["a"], codes["b"],
              root / "kept.npz", root / "fresh" / "out.npz")
    Image.new("RGB", (8, 8)).save(w.root / "picture.png")
    (w.root / "bad.png").write_bytes(b"\x89PNG but not really")
    (w.root / "badlist.txt").write_text("bad.png\nmissing.png\n")
    (w.root / "blocker").write_text("a file where a folder should be")
    (w.root / "not-codes.npz").write_bytes(b"PK\x03\x04 broken zip")
    np.savez(w.root / "other.npz", x=np.zeros(3))
    (w.root / "empty-codes").mkdir(exist_ok=True)
    (w.root / "no-image-column.parquet").write_bytes(b"")
    (w.root / "run").mkdir(exist_ok=True)
    return w


def run(capsys, monkeypatch, args: list[str]) -> tuple[int, str]:
    monkeypatch.setenv("COLUMNS", "3000")
    monkeypatch.delenv("TOKENFLOW_DEBUG", raising=False)
    CliState.debug = False
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = stop.value.code
    return (code if isinstance(code, int) else 1), captured.out + captured.err


def _cases(w: World) -> dict[str, tuple[list, list[str]]]:
    """name -> (arguments, what the one error line must contain)."""
    kept = w.kept
    tok = ["--model", w.tok_a, "--device", "cpu"]
    return {
        "tokenize: missing input": (["tokenize", w.root / "nowhere", "-o", kept, *tok], ["nowhere"]),
        "tokenize: truncated checkpoint": (["tokenize", w.images, "-o", kept, "--model", w.truncated],
                                           ["truncated.safetensors", "truncated or corrupt"]),
        "tokenize: wrong checkpoint kind": (["tokenize", w.images, "-o", kept, "--model", w.teacher],
                                            ["teacher.safetensors", "teacher checkpoint", "tokenizer checkpoint"]),
        "tokenize: foreign safetensors": (["tokenize", w.images, "-o", kept, "--model", w.foreign],
                                          ["foreign.safetensors", "not a tokenflow-cli checkpoint", "convert"]),
        "tokenize: unknown recipe as model": (["tokenize", w.images, "-o", kept, "--model", "no-such-recipe"],
                                              ["no-such-recipe"]),
        "tokenize: output under a file": (["tokenize", w.images, "-o", w.root / "blocker" / "c.npz", *tok],
                                          ["blocker"]),
        "tokenize: output is a folder": (["tokenize", w.images, "-o", w.root / "run", *tok], ["is a folder"]),
        "tokenize: no readable image": (["tokenize", w.root / "badlist.txt", "-o", kept, *tok],
                                        ["none of the 2 inputs", "bad.png"]),
        "reconstruct: no readable image": (["reconstruct", w.root / "badlist.txt", "-o", w.fresh.parent, *tok],
                                           ["none of the 2 inputs", "bad.png"]),
        "tokenize: --strict and one bad image": (["tokenize", w.root / "badlist.txt", "-o", kept, "--strict", *tok],
                                                 ["bad.png"]),
        "tokenize: --resume without --shard-size": (["tokenize", w.images, "-o", kept, "--resume", *tok],
                                                    ["--resume needs --shard-size"]),
        "tokenize: shard folder is a file": (["tokenize", w.images, "-o", kept, "--shard-size", "2", *tok],
                                             ["kept.npz", "is a file"]),
        "tokenize: missing tar shard": (["tokenize", w.root / "part-{0..3}.tar", "-o", kept, *tok],
                                        ["part-0.tar does not exist"]),
        "tokenize: parquet that is not one": (["tokenize", w.root / "no-image-column.parquet", "-o", kept, *tok],
                                              ["no-image-column.parquet"]),
        "reconstruct: codes of another tokenizer": (["reconstruct", w.codes_a, "-o", w.fresh.parent, "--model",
                                                     w.tok_b], ["codes_a.npz", "b.safetensors"]),
        "reconstruct: not a codes file": (["reconstruct", w.root / "other.npz", "-o", w.fresh.parent],
                                          ["other.npz", "not a codes file"]),
        "reconstruct: broken npz": (["reconstruct", w.root / "not-codes.npz", "-o", w.fresh.parent],
                                    ["not-codes.npz"]),
        "codes merge: two tokenizers": (["codes", "merge", w.codes_a, w.codes_b, "-o", kept],
                                        ["different tokenizers"]),
        "codes merge: output is an input": (["codes", "merge", w.codes_a, "-o", w.codes_a], ["one of the inputs"]),
        "codes info: empty folder": (["codes", "info", w.root / "empty-codes"], ["empty-codes"]),
        "codes info: missing file": (["codes", "info", w.root / "gone.npz"], ["gone.npz"]),
        "train-tokenizer: bad value": (["train-tokenizer", "tiny", "--set", "train.lr=fast", "-o", w.fresh.parent],
                                       ["train.lr", "fast"]),
        "train-tokenizer: unknown key": (["train-tokenizer", "tiny", "--set", "train.lrr=1", "-o", w.fresh.parent],
                                         ["lrr"]),
        "train-tokenizer: recipe of another kind": (["train-tokenizer", "generator-tiny", "-o", w.fresh.parent],
                                                    ["generator"]),
        "train-generator: no codes there": (["train-generator", "generator-tiny", "--set",
                                             f"data.codes={w.root / 'empty-codes'}", "-o", w.fresh.parent],
                                            ["empty-codes"]),
        "generate: truncated checkpoint": (["generate", "a red fox", "--model", w.truncated, "-o", w.fresh.parent],
                                           ["truncated.safetensors"]),
        "generate: a tokenizer as generator": (["generate", "a red fox", "--model", w.tok_a, "-o", w.fresh.parent],
                                               ["a.safetensors"]),
        "ask: missing image": (["ask", w.root / "missing.png", "What colour?"], ["missing.png"]),
        "eval rfid: missing images": (["eval", "rfid", w.root / "nowhere", "--model", w.tok_a, "-o",
                                       w.fresh.parent], ["nowhere"]),
        "convert: not a checkpoint": (["convert", w.root / "picture.png", "-o", w.fresh], ["picture.png"]),
        "convert: missing source": (["convert", w.root / "missing.pt", "-o", w.fresh], ["missing.pt"]),
        "usage: tokenize batch size 0": (["tokenize", w.images, "-o", kept, "-b", "0"], ["--batch-size"]),
        "usage: tokenize shard size 0": (["tokenize", w.images, "-o", kept, "--shard-size", "0"], ["--shard-size"]),
        "usage: generate top-p 3": (["generate", "a red fox", "--p1", "3", "-o", w.fresh.parent], ["--p1"]),
        "usage: ask negative temperature": (["ask", w.root / "picture.png", "?", "--temperature", "-1"],
                                            ["--temperature"]),
        "usage: unknown option": (["tokenize", w.images, "--colour", "red"], ["--colour", "tokenflow tokenize --help"]),
    }


CASE_NAMES = list(_cases(World(*[Path("/zoo")] * 11)))  # _cases only joins paths


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_invocation(world, case, capsys, monkeypatch):
    args, named = _cases(world)[case]
    world.kept.write_bytes(KEPT)
    before = {p for p in world.root.rglob("*")}
    code, output = run(capsys, monkeypatch, args)
    assert code == (2 if case.startswith("usage:") else 1), output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for name in named:
        assert str(name) in lines[0], f"{name!s} not in {lines[0]!r}"
    assert world.kept.read_bytes() == KEPT, "an existing output was overwritten"
    assert not world.fresh.exists()
    new = {p for p in world.root.rglob("*")} - before
    partial = [p for p in new if p.is_file() and p.suffix in (".npz", ".safetensors", ".png", ".json", ".pt")
               or ".tmp" in p.name]
    assert not partial, f"partial outputs left: {partial}"


@pytest.mark.parametrize("how", ["--debug", "TOKENFLOW_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_user_error(world, how, monkeypatch):
    monkeypatch.setenv("TOKENFLOW_DEBUG", "1" if how != "--debug" else "0")
    flag = ["--debug"] if how == "--debug" else []
    with pytest.raises(CodesMismatchError, match="different tokenizers"):
        main([*flag, "codes", "merge", str(world.codes_a), str(world.codes_b), "-o", str(world.root / "m.npz")])
    assert not (world.root / "m.npz").exists()
