"""A write that fails part way (here: a file-size limit, RLIMIT_FSIZE; a full disk raises the
same way with ENOSPC) leaves the previous file intact, no temporary file behind, and says so in
one error; a checkpoint's embedded config is checked like a recipe before anything is built."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenflow_cli.checkpoint import save_train_state, save_weights
from tokenflow_cli.config import ConfigError
from tokenflow_cli.fileio import OutputWriteError, atomic_write_text
from tokenflow_cli.tokenizer.codes import write_codes
from tokenflow_cli.tokenizer.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 1024  # bytes: the old files fit, the new ones do not


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Lower the soft RLIMIT_FSIZE for this process (Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _writers(tmp_path: Path):
    big = torch.zeros(LIMIT)  # 4 * LIMIT bytes
    rows = np.zeros((LIMIT, 5), np.int32)  # 20 * LIMIT bytes
    return {
        "weights": (tmp_path / "w.safetensors", lambda p, t: save_weights({"w": t}, p, {"x": 1})),
        "train state": (tmp_path / "train_state.pt", lambda p, t: save_train_state({"w": t, "step": 3}, p)),
        "codes": (tmp_path / "c.npz", lambda p, n: write_codes(p, rows[:n], (1, 2), [str(i) for i in range(n)])),
        "text": (tmp_path / "m.json", lambda p, n: atomic_write_text(p, "x" * 4 * n)),
    }, big


@pytest.mark.parametrize("kind", ["weights", "train state", "codes", "text"])
def test_a_failed_write_keeps_the_previous_file_and_says_so(tmp_path, kind):
    writers, big = _writers(tmp_path)
    path, write = writers[kind]
    small, large = (torch.zeros(4), big) if kind in ("weights", "train state") else (4, LIMIT)
    write(path, small)
    before = path.read_bytes()
    with file_size_limit(LIMIT), pytest.raises(OutputWriteError) as err:
        write(path, large)
    assert f"could not write {path}" in str(err.value) and "is unchanged" in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_tokenize_under_a_file_size_limit_is_one_line_and_keeps_the_old_codes(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(40):
        Image.new("RGB", (16, 16), (6 * i, 100, 200 - 5 * i)).save(images / f"{i:02d}.png")
    out = tmp_path / "codes.npz"
    out.write_bytes(b"earlier codes")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "3000", "PYTHONPATH": str(REPO),
           "TOKENFLOW_HOME": str(tmp_path / "home")}  # the labelled random-init tokenizer, whatever else ran
    done = subprocess.run([sys.executable, "-m", "tokenflow_cli", "tokenize", str(images), "-o", str(out),
                           "--device", "cpu"], env=env, capture_output=True, text=True, preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "unchanged" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert out.read_bytes() == b"earlier codes"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["codes.npz", "imgs"]


def test_a_checkpoint_config_is_checked_like_a_recipe_before_building(tmp_path, tiny_tokenizer):
    from tokenflow_cli.config import to_dict

    config = to_dict(tiny_tokenizer.config)
    config["quantizer"]["codebook_size"] = "lots"
    path = tmp_path / "odd.safetensors"
    save_weights({"w": torch.zeros(1)}, path, config, kind="tokenizer")  # no weights needed: it fails first
    with pytest.raises(ConfigError, match=r"odd.safetensors.*codebook_size"):
        load_tokenizer(path)
