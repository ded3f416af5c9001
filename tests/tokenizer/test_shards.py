"""Sharded, resumable tokenize: shards equal a one-file run, a resume after a kill (or a deleted
or half-written shard) ends with the same bytes, a different process count may resume, and a
run never silently mixes inputs or tokenizers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tokenflow_cli.checkpoint import save_model
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.data.sources import open_source
from tokenflow_cli.errors import UserError
from tokenflow_cli.tokenizer.codes import list_codes_files, read_codes
from tokenflow_cli.tokenizer.codes_summary import summarize_codes
from tokenflow_cli.tokenizer.reconstruct import reconstruct_codes_file
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.tokenizer.shards import tokenize_to_shards
from tokenflow_cli.tokenizer.tokenize import tokenize_paths

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard-images")
    render_shapes_world(root, 30, seed=3, size=32)
    (root / "images" / "zz-broken.png").write_bytes(b"not a png")  # reported and skipped in its shard
    return root / "images"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, tiny_tokenizer_module) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_model(tiny_tokenizer_module, path, tiny_tokenizer_module.config, kind="tokenizer")
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer_module():
    import torch

    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer

    torch.manual_seed(0)
    recipe = load_recipe("tiny", TokenizerRecipe)
    return build_tokenizer(recipe.model).eval()


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("codes-*.npz"))}


def test_shards_equal_a_one_file_run_and_the_manifest_lists_them(images, tokenizer_file, tmp_path):
    resolved = resolve_tokenizer(str(tokenizer_file), "cpu")
    whole = tokenize_paths(resolved, open_source(images), tmp_path / "whole.npz", batch_size=4)
    result = tokenize_to_shards(resolved, open_source(images), tmp_path / "run", shard_size=8, batch_size=4)
    assert (result.total_shards, result.shards_written, result.n_images) == (4, 4, 30)
    assert [f for f, _ in result.failures] == [str(images / "zz-broken.png")]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["images"] == 30 and len(manifest["shards"]) == 4
    assert manifest["tokenizer"]["sha256"] and manifest["inputs"]["count"] == 31
    parts = [read_codes(p) for p in list_codes_files(tmp_path / "run")]
    one = read_codes(whole.output)
    assert np.array_equal(np.concatenate([p.indices for p in parts]), one.indices)
    assert list(np.concatenate([p.paths for p in parts])) == list(one.paths)
    summary = summarize_codes(tmp_path / "run")
    assert summary.images == 30 and summary.failed == 1 and summary.manifest["complete"]
    decoded = reconstruct_codes_file(resolved, tmp_path / "run", tmp_path / "recon", batch_size=16)
    assert decoded.n_images == 30 and len(list((tmp_path / "recon").glob("*.png"))) == 31  # + grid.png


def test_resume_redoes_missing_and_half_written_shards_to_the_same_bytes(images, tokenizer_file, tmp_path):
    resolved = resolve_tokenizer(str(tokenizer_file), "cpu")
    tokenize_to_shards(resolved, open_source(images), tmp_path / "ref", shard_size=8, batch_size=4)
    run = tmp_path / "run"
    tokenize_to_shards(resolved, open_source(images), run, shard_size=8, batch_size=4)
    (run / "codes-00001.npz").unlink()  # as if killed before it was written
    (run / ".codes-00002.abc.tmp.npz").write_bytes(b"half a shard")  # killed while writing
    (run / "codes-00003.npz").write_bytes(b"")  # damaged later: its checksum no longer matches
    with pytest.raises(UserError, match="--resume"):
        tokenize_to_shards(resolved, open_source(images), run, shard_size=8, batch_size=4)
    again = tokenize_to_shards(resolved, open_source(images), run, shard_size=8, batch_size=4, resume=True)
    assert (again.shards_skipped, again.shards_written) == (2, 2)
    assert _shard_bytes(run) == _shard_bytes(tmp_path / "ref")
    assert not list(run.glob(".codes-*"))


def test_resume_refuses_another_tokenizer_or_shard_size(images, tokenizer_file, tmp_path):
    resolved = resolve_tokenizer(str(tokenizer_file), "cpu")
    tokenize_to_shards(resolved, open_source(images), tmp_path / "run", shard_size=8, batch_size=4)
    with pytest.raises(UserError, match="shard size 8, this one 16"):
        tokenize_to_shards(resolved, open_source(images), tmp_path / "run", shard_size=16, resume=True)
    other = resolve_tokenizer("tiny", "cpu")  # a recipe: random init, another tokenizer
    with pytest.raises(UserError, match="cannot resume .* tokenizer"):
        tokenize_to_shards(other, open_source(images), tmp_path / "run", shard_size=8, resume=True)


def _cli(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "tokenflow_cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "tokenflow_cli",
            *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run_until(cmd: list[str], folder: Path, shards: int, timeout: float = 120.0) -> None:
    """Start `cmd` and SIGKILL it once `shards` shard files exist (then it is inside the next shard)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while len(list(folder.glob("codes-*.npz"))) < shards and proc.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_twice_then_resumed_with_another_process_count_equals_an_uninterrupted_run(
        images, tokenizer_file, tmp_path):
    common = ["tokenize", str(images), "--model", str(tokenizer_file), "--shard-size", "4", "-b", "2",
              "--device", "cpu"]
    subprocess.run(_cli(*common, "-o", str(tmp_path / "ref")), env=_env(), check=True, capture_output=True)
    run = tmp_path / "run"
    _run_until(_cli(*common, "-o", str(run)), run, shards=2)
    _run_until(_cli(*common, "-o", str(run), "--resume"), run, shards=4)
    done = subprocess.run(_cli(*common, "-o", str(run), "--resume", nproc=2), env=_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert _shard_bytes(run) == _shard_bytes(tmp_path / "ref")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_shards"] == 8
