"""Two CPU processes under torchrun (gloo): DDP training whose checkpoint loads in one process,
and sharded `tokenize` whose merged file matches a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tokenflow_cli.checkpoint import STATE_NAME, load_train_state
from tokenflow_cli.train.state import latest_checkpoint


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tokenflow_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from tokenflow_cli.data.shapes import render_shapes_world

    root = tmp_path_factory.mktemp("ddp")
    render_shapes_world(root / "shapes", n=10, seed=1, size=64)
    run = root / "run"
    proc = torchrun(
        "train-tokenizer", "tiny", "-o", str(run), "--device", "cpu", "--steps", "2",
        "--set", f"data.train={root / 'shapes' / 'images'}", "--set", "train.batch_size=2",
        "--set", "model.quantizer.codebook_size=64", "--set", "train.log_every=1", "--set", "train.eval_every=2",
        "--set", "data.val_limit=2", "--set", "train.dead_code_restart_steps=1",
        cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, run, proc


def test_two_rank_ddp_trains_and_its_checkpoint_loads_in_one_process(ddp_run):
    from tokenflow_cli.tokenizer.model import load_tokenizer

    root, run, proc = ddp_run
    assert proc.stdout.count("finished step 2") == 1  # rank 0 reports, rank 1 stays quiet
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2)]
    state = load_train_state(latest_checkpoint(run) / STATE_NAME)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks draw differently
    tok = load_tokenizer(run)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.isfinite(tok.codes_to_img(tok.img_to_codes(img))).all()


def test_two_rank_tokenize_merges_shards_like_one_process(ddp_run):
    from tokenflow_cli.tokenizer.codes import read_codes
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths

    root, run, _ = ddp_run
    images = root / "shapes" / "images"
    proc = torchrun("tokenize", str(images), "-o", str(root / "codes2.npz"), "--model", str(run), "--device", "cpu",
                    "-b", "3", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = read_codes(root / "codes2.npz")
    assert not list(root.glob("codes2-*-of-*.npz"))  # shards removed after the merge
    resolved = resolve_tokenizer(str(run), torch.device("cpu"))
    tokenize_paths(resolved, sorted(images.glob("*.png")), root / "codes1.npz", batch_size=3)
    single = read_codes(root / "codes1.npz")
    assert len(merged) == len(single) == 10
    by_path = {p: row for p, row in zip(single.paths, single.indices)}
    for path, row in zip(merged.paths, merged.indices):
        np.testing.assert_array_equal(row, by_path[path])
