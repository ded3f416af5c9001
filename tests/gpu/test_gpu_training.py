"""Training on CUDA: one optimizer step of every stage (tokenizer, generator, LLaVA, teacher)
under bf16 autocast, and a 1-process nccl group that initialises and tears down."""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch

from tokenflow_cli.checkpoint import save_model
from tokenflow_cli.config import load_recipe
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import build_tokenizer

pytestmark = pytest.mark.gpu
ONE_STEP = ["train.steps=1", "train.precision=bf16", "train.batch_size=4", "train.eval_every=0",
            "train.log_every=1", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_world")
    render_shapes_world(root / "shapes", 8, seed=0, size=64, llava=True)
    torch.manual_seed(0)
    cfg = load_recipe("tiny", TokenizerRecipe).model
    save_model(build_tokenizer(cfg), root / "tok.safetensors", cfg, kind="tokenizer")
    return root


def _finite_train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and all(v == v for r in train for v in r.values() if isinstance(v, float)), train
    return train


def test_tokenizer_step(world, tmp_path, device):
    from tokenflow_cli.tokenizer.stage import train_tokenizer

    recipe = load_recipe("tiny", TokenizerRecipe, [f"data.train={world / 'shapes' / 'images'}", *ONE_STEP])
    train_tokenizer(recipe, tmp_path / "run", device=str(device), live=False)
    _finite_train_rows(tmp_path / "run")


def test_generator_step(world, tmp_path, device):
    from tokenflow_cli.generation.config import GeneratorRecipe
    from tokenflow_cli.generation.stage import GeneratorStage
    from tokenflow_cli.train.loop import train

    sets = [f"data.images={world / 'shapes' / 'images'}", f"data.captions={world / 'shapes' / 'captions.jsonl'}",
            f"data.tokenizer={world / 'tok.safetensors'}", "data.num_workers=0", "model.hidden_size=64",
            "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=128",
            "model.attn_implementation=sdpa", *ONE_STEP]
    recipe = load_recipe("generator-tiny-official", GeneratorRecipe, sets)
    run = tmp_path / "run"
    train(GeneratorStage(recipe, run), recipe.train, run, recipe=recipe, device=str(device), live=False)
    _finite_train_rows(run)


def test_llava_step(world, tmp_path, device):
    from tokenflow_cli.understanding.config import LlavaRecipe
    from tokenflow_cli.understanding.stage import finetune_llava

    sets = [f"model.tokenizer={world / 'tok.safetensors'}", f"data.train={world / 'shapes' / 'llava.json'}",
            "data.val=", "model.tiny_llm.hidden_size=32", "model.tiny_llm.num_layers=1", *ONE_STEP]
    recipe = load_recipe("llava-tiny", LlavaRecipe, sets)
    recipe = dataclasses.replace(recipe, stage1=dataclasses.replace(recipe.stage1, steps=1))
    finetune_llava(recipe, 1, tmp_path / "run", device=str(device), live=False)
    _finite_train_rows(tmp_path / "run")


def test_teacher_step(tmp_path, device):
    from tokenflow_cli.teacher.config import TeacherRecipe
    from tokenflow_cli.teacher.stage import train_teacher

    recipe = load_recipe("teacher-tiny", TeacherRecipe, ["data.shapes=8", *ONE_STEP])
    train_teacher(recipe, tmp_path / "run", device=str(device), live=False)
    _finite_train_rows(tmp_path / "run")


def test_one_process_nccl_group_initialises_and_tears_down(device, monkeypatch):
    import torch.distributed as dist

    from tokenflow_cli.distributed import cleanup, init_distributed

    if device.type != "cuda":
        pytest.skip("nccl is CUDA's")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert init_distributed("cuda").world_size == 1  # a single process: our helper stays out of the way
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert dist.get_backend() == "nccl"
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        assert x.tolist() == [1.0] * 4
    finally:
        cleanup()
    assert not dist.is_initialized() and os.environ["WORLD_SIZE"] == "1"
