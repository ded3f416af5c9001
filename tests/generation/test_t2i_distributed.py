"""The official t2i layout (generator-tiny-official.yaml: the QK-norm post-norm block, chained
inputs, in-place multi-step, fixed-length prompts) trains under torchrun with DDP and with FSDP
on two CPU processes (gloo), with activation checkpointing, to the same weights; the FSDP
checkpoint loads in one process and samples. Slow (two torchrun runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenflow_cli.checkpoint import WEIGHTS_NAME, save_model
from tokenflow_cli.config import load_recipe
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.generation.sampling import get_schedule
from tokenflow_cli.generation.text_to_image import TextToImage
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import build_tokenizer
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
from tokenflow_cli.tokenizer.tokenize import tokenize_paths
from tokenflow_cli.train.state import step_dir

STEPS = 2


def _torchrun(args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tokenflow_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_official_layout_trains_the_same_under_ddp_and_fsdp(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tok = build_tokenizer(load_recipe("tiny", TokenizerRecipe).model).eval()
    save_model(tok, tmp_path / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    render_shapes_world(tmp_path / "shapes", n=8, seed=0, size=64)
    resolved = resolve_tokenizer(str(tmp_path / "tok"), torch.device("cpu"))
    tokenize_paths(resolved, sorted((tmp_path / "shapes" / "images").glob("*.png")), tmp_path / "codes.npz")
    sets = [f"data.codes={tmp_path / 'codes.npz'}", f"data.captions={tmp_path / 'shapes' / 'captions.jsonl'}",
            f"data.tokenizer={tmp_path / 'tok'}", "data.text_vocab_size=300", "model.hidden_size=32",
            "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=64",
            "model.gradient_checkpointing=true", f"train.steps={STEPS}", "train.batch_size=2",
            "train.log_every=1", f"train.eval_every={STEPS}", "train.checkpoint_every=1", "train.warmup_steps=0",
            "train.schedule=constant", "eval.schedule=two-pass"]
    weights = {}
    for strategy in ("ddp", "fsdp"):
        args = ["train-generator", "generator-tiny-official", "-o", str(tmp_path / strategy), "--device", "cpu",
                *[x for s in sets for x in ("--set", s)], "--set", f"train.distributed={strategy}"]
        _torchrun(args, tmp_path)
        weights[strategy] = load_file(str(step_dir(tmp_path / strategy, STEPS) / WEIGHTS_NAME))
    assert any(".q_norm." in k for k in weights["fsdp"]) and not any("draft_projector" in k for k in weights["fsdp"])
    for key, value in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    loaded = TextToImage.from_pretrained(tmp_path / "fsdp")
    assert loaded.model.config.multi_step == "inplace" and loaded.model.lm.config.model_type == "exaone4"
    text = loaded.prompts(["a red circle"])
    codes = loaded.model.generate(loaded.tokenizer, text, None, get_schedule("three-pass"),
                                  generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, loaded.model.num_image_tokens)
