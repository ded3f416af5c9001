"""A zoo of bad invocations driven through the real entry point (`tokenflow_cli.cli.app.main`):
each must exit non-zero with exactly one `error:` line naming the culprit, print no traceback,
leave no partial output and overwrite nothing that existed."""

from __future__ import annotations

import json
import os
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
from tokenflow_cli.fileio import MARKER_NAME
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
    (w.root / "others").mkdir(exist_ok=True)
    (w.root / "others" / "notes.txt").write_text("a user's folder, not an output of ours")
    (w.root / "reconstructed").mkdir(exist_ok=True)
    (w.root / "reconstructed" / MARKER_NAME).write_text(json.dumps({"command": "reconstruct"}))
    (w.root / ".busy.npz.lock").write_text(str(os.getpid()))  # held by a live process: this one
    _bad_codes(w)
    return w


def _bad_codes(w: World) -> None:
    """One codes file per way of breaking the format, each from codes_a with one change."""
    with np.load(w.codes_a) as data:
        good = {k: data[k] for k in data.files}
    idx, k = good["indices"], json.loads(str(good["meta"]))["codebook_size"]
    changes = {"index-huge": {"indices": np.where(np.arange(idx.size).reshape(idx.shape) == 7, 999999, idx)},
               "index-k": {"indices": np.where(np.arange(idx.size).reshape(idx.shape) == 7, k, idx)},
               "float": {"indices": idx.astype(np.float32)},
               "short-paths": {"paths": good["paths"][:3]},
               "flat": {"indices": idx.reshape(-1)},
               "extra-axis": {"indices": idx[..., None]}}
    for name, change in changes.items():
        np.savez(w.root / f"codes-{name}.npz", **{**good, **change})


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
        # codes that break the format: one validation (tokenizer/codes.check_codes) for every reader
        **{f"reconstruct: codes with {what}": (["reconstruct", w.root / f"codes-{name}.npz", "-o", w.fresh.parent],
                                               [f"codes-{name}.npz", *named])
           for what, name, named in [("an index of 999999", "index-huge", ["999999", "outside the codebook [0, "]),
                                     ("an index equal to K", "index-k", ["outside the codebook [0, "]),
                                     ("float indices", "float", ["float32", "integer"]),
                                     ("fewer paths than rows", "short-paths", ["3 paths for 6 rows"]),
                                     ("1-D indices", "flat", ["shape", "(N, "]),
                                     ("(N, L, 1) indices", "extra-axis", ["shape", "(N, "])]},
        "codes info: an index outside the codebook": (["codes", "info", w.root / "codes-index-huge.npz"],
                                                      ["999999", "outside the codebook"]),
        "codes merge: float indices": (["codes", "merge", w.codes_a, w.root / "codes-float.npz", "-o", w.fresh],
                                       ["codes-float.npz", "float32"]),
        # outputs: checked before any work; folders swapped in whole; one writer at a time
        "reconstruct: output under a file": (["reconstruct", w.codes_a, "-o", w.root / "blocker" / "recon"],
                                             ["blocker", "is a file"]),
        "reconstruct: output is a file": (["reconstruct", w.codes_a, "-o", kept], ["kept.npz", "is a file"]),
        "reconstruct: a folder of other files": (["reconstruct", w.codes_a, "-o", w.root / "others"],
                                                 ["others", "--overwrite"]),
        "generate: output under a file": (["generate", "a red fox", "-o", w.root / "blocker" / "gen"], ["blocker"]),
        "generate: a folder another command wrote": (["generate", "a red fox", "-o", w.root / "reconstructed"],
                                                     ["reconstructed", "tokenflow generate", "--overwrite"]),
        "data shapes: output under a file": (["data", "shapes", "-n", "2", "-o", w.root / "blocker" / "d"],
                                             ["blocker"]),
        "data natural: output is a file": (["data", "natural", "-n", "2", "-o", kept], ["kept.npz", "is a file"]),
        "train-tokenizer: run folder under a file": (["train-tokenizer", "tiny", "-o", w.root / "blocker" / "run"],
                                                     ["blocker"]),
        "eval teacher: output under a file": (["eval", "teacher", "-o", w.root / "blocker" / "e"], ["blocker"]),
        "eval geneval: output under a file": (["eval", "geneval", "-o", w.root / "blocker" / "e"], ["blocker"]),
        "eval rfid: output under a file": (["eval", "rfid", w.images, "--model", w.tok_a, "-o",
                                            w.root / "blocker" / "e"], ["blocker", "is a file"]),
        "eval rfid: output is a file": (["eval", "rfid", w.images, "--model", w.tok_a, "-o", kept],
                                        ["kept.npz", "is a file"]),
        "eval usage: output under a file": (["eval", "usage", w.images, "--model", w.tok_a, "-o",
                                             w.root / "blocker" / "e"], ["blocker", "is a file"]),
        "eval usage: a folder of other files": (["eval", "usage", w.images, "--model", w.tok_a, "-o",
                                                 w.root / "others"], ["others", "--overwrite"]),
        "eval usage: missing images": (["eval", "usage", w.root / "nowhere", "--model", w.tok_a, "-o",
                                        w.fresh.parent], ["nowhere"]),
        "codes merge: output under a file": (["codes", "merge", w.codes_a, "-o", w.root / "blocker" / "m.npz"],
                                             ["blocker"]),
        "tokenize: another process writes the output": (["tokenize", w.images, "-o", w.root / "busy.npz", *tok],
                                                        ["busy.npz", "being written by another"]),
        "train-generator: no data flags (as the README once showed it)": (
            ["train-generator", "generator-tiny", "-o", w.fresh.parent], ["data.captions", "data.codes"]),
        # a model named by the environment must exist
        "tokenize: $TOKENFLOW_TOKENIZER names a missing model": (
            ["tokenize", w.images, "-o", kept, "--device", "cpu"], ["TOKENFLOW_TOKENIZER", "no-such-tok"],
            {"TOKENFLOW_TOKENIZER": str(w.root / "no-such-tok.safetensors")}),
        "generate: $TOKENFLOW_GENERATOR names a missing model": (
            ["generate", "a red fox", "-o", w.fresh.parent, "--device", "cpu"], ["TOKENFLOW_GENERATOR", "no-such-gen"],
            {"TOKENFLOW_GENERATOR": str(w.root / "no-such-gen")}),
        # numeric options: at parse time
        "usage: eval rfid negative resolution": (["eval", "rfid", "--res", "-5", "-o", w.fresh.parent], ["--res"]),
        "usage: eval rfid huge resolution": (["eval", "rfid", "--res", "100000", "-o", w.fresh.parent], ["--res"]),
        "usage: train-teacher zero steps": (["train-teacher", "teacher-tiny", "--steps", "0", "-o", w.fresh.parent],
                                            ["--steps"]),
    }


CASE_NAMES = list(_cases(World(*[Path("/zoo")] * 11)))  # _cases only joins paths
assert len(CASE_NAMES) == len(set(CASE_NAMES))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_invocation(world, case, capsys, monkeypatch):
    args, named, *env = _cases(world)[case]
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    world.kept.write_bytes(KEPT)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in world.root.rglob("*") if p.is_file()}
    folders = {p for p in world.root.rglob("*") if p.is_dir()}
    code, output = run(capsys, monkeypatch, args)
    assert code == (2 if case.startswith("usage:") else 1), output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for name in named:
        assert str(name) in lines[0], f"{name!s} not in {lines[0]!r}"
    assert world.kept.read_bytes() == KEPT, "an existing output was overwritten"
    assert not world.fresh.exists() and not world.fresh.parent.exists()
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in world.root.rglob("*") if p.is_file()}
    assert after == before, f"files changed or left behind: {set(after.items()) ^ set(before.items())}"
    assert {p for p in world.root.rglob("*") if p.is_dir()} == folders, "folders made or removed"


@pytest.mark.parametrize("how", ["--debug", "TOKENFLOW_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_user_error(world, how, monkeypatch):
    monkeypatch.setenv("TOKENFLOW_DEBUG", "1" if how != "--debug" else "0")
    flag = ["--debug"] if how == "--debug" else []
    with pytest.raises(CodesMismatchError, match="different tokenizers"):
        main([*flag, "codes", "merge", str(world.codes_a), str(world.codes_b), "-o", str(world.root / "m.npz")])
    assert not (world.root / "m.npz").exists()
