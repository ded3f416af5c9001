"""`train.distributed: fsdp` on two CPU processes (torchrun, gloo): the tiny generator trains
sharded, its checkpoint is in the one-process format (it resumes in one process), and FSDP gives
the weights DDP gives. The LLaVA stage 2 run is slow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tokenflow_cli.checkpoint import STATE_NAME, WEIGHTS_NAME, load_train_state
from tokenflow_cli.train.state import EMA_NAME, latest_checkpoint, step_dir

STEPS = 3


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tokenflow_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def generator_data(tmp_path_factory) -> tuple[Path, list[str]]:
    """A random tiny image tokenizer, the shapes world's codes and captions, and the --set
    options of a 2-layer generator (2 FSDP units, recomputed in the backward as the 7B recipe
    does) trained for STEPS steps with gradient accumulation and EMA."""
    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths

    root = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    tok = build_tokenizer(load_recipe("tiny", TokenizerRecipe).model).eval()
    save_model(tok, root / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    render_shapes_world(root / "shapes", n=8, seed=0, size=64)
    resolved = resolve_tokenizer(str(root / "tok"), torch.device("cpu"))
    tokenize_paths(resolved, sorted((root / "shapes" / "images").glob("*.png")), root / "codes.npz")
    sets = [f"data.codes={root / 'codes.npz'}", f"data.captions={root / 'shapes' / 'captions.jsonl'}",
            f"data.tokenizer={root / 'tok'}", "data.text_vocab_size=300", "model.hidden_size=32",
            "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=64",
            "model.refine_prob=0.5", "model.gradient_checkpointing=true", f"train.steps={STEPS}",
            "train.batch_size=2", "train.grad_accum=2", "train.log_every=1", f"train.eval_every={STEPS}",
            "train.checkpoint_every=1", "train.warmup_steps=0", "train.schedule=constant", "train.ema_decay=0.5",
            "eval.schedule=one-pass"]
    return root, [x for s in sets for x in ("--set", s)]


def train_generator(root: Path, sets: list[str], run: Path, distributed: str) -> subprocess.CompletedProcess:
    return torchrun("train-generator", "generator-tiny", "-o", str(run), "--device", "cpu", *sets,
                    "--set", f"train.distributed={distributed}", cwd=root)


@pytest.fixture(scope="module")
def fsdp_run(generator_data) -> tuple[Path, subprocess.CompletedProcess]:
    root, sets = generator_data
    run = root / "fsdp"
    return run, train_generator(root, sets, run, "fsdp")


def test_fsdp_generator_checkpoint_has_the_one_process_format(fsdp_run) -> None:
    from tokenflow_cli.generation.sampling import get_schedule
    from tokenflow_cli.generation.text_to_image import TextToImage

    run, proc = fsdp_run
    assert (proc.stdout + proc.stderr).count("FSDP: 2 units + 1 root(s) sharded over 2 ranks") == 1  # rank 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in train_rows)
    assert (run / "samples" / f"step-{STEPS:08d}.png").is_file()  # rank 0 sampled from gathered weights

    loaded = TextToImage.from_pretrained(run)
    weights = loaded.model.state_dict()
    state = load_train_state(latest_checkpoint(run) / STATE_NAME)
    assert state["step"] == STEPS and state["world_size"] == 2
    optimizer = state["optimizers"]["main"]
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    assert sorted(optimizer["state"]) == list(range(len(params)))  # integer keys, every parameter
    for i, p in enumerate(params):  # whole moments, not shards
        assert optimizer["state"][i]["exp_avg"].shape == p.shape
    ema = load_file(str(run / EMA_NAME))
    assert ema.keys() == weights.keys() and all(ema[k].shape == v.shape for k, v in weights.items())
    assert not torch.equal(ema["head.weight"], weights["head.weight"])
    text = loaded.prompts(["a photo of a red circle"])
    codes = loaded.model.generate(loaded.tokenizer, text, None, get_schedule("one-pass"),
                                  generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, loaded.model.num_image_tokens)


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_run, generator_data, tmp_path) -> None:
    from tokenflow_cli.cli.app import app

    run, _ = fsdp_run
    _, sets = generator_data
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    args = ["train-generator", "generator-tiny", "-o", str(resumed), "--device", "cpu", *sets,
            "--set", f"train.steps={STEPS + 1}", "--set", "train.eval_every=0", "--set", "train.distributed=fsdp"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "one process, nothing to shard" in result.output
    state = load_train_state(latest_checkpoint(resumed) / STATE_NAME)
    assert state["step"] == STEPS + 1 and state["world_size"] == 1
    before = load_file(str(step_dir(run, STEPS) / WEIGHTS_NAME))
    after = load_file(str(resumed / WEIGHTS_NAME))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _tiny_generator(lm_dtype: torch.dtype):
    from tokenflow_cli.generation.config import GeneratorModelConfig
    from tokenflow_cli.generation.model import build_generator

    torch.manual_seed(0)
    cfg = GeneratorModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                               text_vocab_size=40, max_text_tokens=4, scales=(1, 2), codebook_size=16, code_dim=6)
    model = build_generator(cfg)
    model.lm.to(lm_dtype)  # as a pretrained LM loaded with model.lm_dtype=bf16
    return model


def test_dtype_units_split_a_bf16_lm_from_fp32_new_parts() -> None:
    from tokenflow_cli.train.fsdp import dtype_units, transformer_blocks

    model = _tiny_generator(torch.bfloat16)
    layers = transformer_blocks(model.lm)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    split = dtype_units(model, layers)  # the root owns fp32 start/scale/position embeddings
    assert [id(m) for m in split] == [id(model.lm.norm), id(model.lm.embed_tokens)]
    assert dtype_units(_tiny_generator(torch.float32), layers) == []
    model.lm.requires_grad_(False)  # LLaVA stage 1: a frozen LM needs no split
    assert dtype_units(model, layers) == []


def _shard_mixed_dtypes(rank: int, port: int) -> None:
    import torch.distributed as dist

    from tokenflow_cli.train.fsdp import shard, transformer_blocks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _tiny_generator(torch.bfloat16)
        assert shard(model, transformer_blocks(model.lm), torch.device("cpu"), 2, "fp32") == 4
        model.unshard()  # FSDP checks each unit's dtypes here
        assert model.head.weight.shape == (16, 32)
        model.reshard()
        dist.barrier()  # neither rank tears gloo down while the other still uses it (rank 1 aborted, 1 run in ~8)
    finally:
        dist.destroy_process_group()


def test_fsdp_shards_a_bf16_lm_under_fp32_new_parts() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_shard_mixed_dtypes, args=(port,), nprocs=2)


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_exactly(fsdp_run, generator_data) -> None:
    root, sets = generator_data
    run, _ = fsdp_run
    fsdp_weights = load_file(str(step_dir(run, STEPS) / WEIGHTS_NAME))
    ddp = root / "ddp"
    train_generator(root, sets, ddp, "ddp")
    ddp_weights = load_file(str(step_dir(ddp, STEPS) / WEIGHTS_NAME))
    for key, value in ddp_weights.items():  # same data, same gradient mean: only summation order differs
        torch.testing.assert_close(fsdp_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)

    resumed = root / "fsdp-resumed"  # the step-2 checkpoint, resumed under FSDP
    shutil.copytree(run, resumed)
    shutil.rmtree(step_dir(resumed, STEPS))
    train_generator(root, sets, resumed, "fsdp")
    again = load_file(str(step_dir(resumed, STEPS) / WEIGHTS_NAME))
    for key, value in fsdp_weights.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)
    moments = [load_train_state(step_dir(r, STEPS) / STATE_NAME)["optimizers"]["main"]["state"]
               for r in (run, resumed)]
    for i, s in moments[0].items():
        torch.testing.assert_close(moments[1][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_fsdp_llava_stage2_exports_a_loadable_model(tmp_path) -> None:
    import yaml

    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.config import load_recipe, to_dict
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer
    from tokenflow_cli.understanding.config import LlavaDataConfig, LlavaModelConfig, LlavaRecipe, TinyLMConfig
    from tokenflow_cli.understanding.model import LlavaModel

    render_shapes_world(tmp_path / "shapes", 6, seed=0, size=64, llava=True)
    render_shapes_world(tmp_path / "held_out", 2, seed=1, size=64, llava=True)
    torch.manual_seed(0)
    cfg = load_recipe("tiny", TokenizerRecipe).model
    save_model(build_tokenizer(cfg), tmp_path / "tok.safetensors", cfg, kind="tokenizer")
    lm = TinyLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=320, vocab_size=300)
    recipe = LlavaRecipe(
        model=LlavaModelConfig(tokenizer=str(tmp_path / "tok.safetensors"), tiny_llm=lm, max_length=320),
        data=LlavaDataConfig(train=str(tmp_path / "shapes" / "llava.json"),
                             val=str(tmp_path / "held_out" / "llava.json"), val_limit=2),
        train=load_recipe("llava-tiny", LlavaRecipe).train,
    )
    tree = to_dict(recipe)
    tree["train"].update(steps=2, batch_size=2, eval_every=2, checkpoint_every=1, log_every=1, distributed="fsdp")
    tree["model"]["gradient_checkpointing"] = True  # as the 13B recipe, recomputed layers are FSDP units
    (tmp_path / "llava.yaml").write_text(yaml.safe_dump(tree))
    run = tmp_path / "run"
    proc = torchrun("finetune-llava", str(tmp_path / "llava.yaml"), "--stage", "2", "-o", str(run),
                    "--device", "cpu", cwd=tmp_path)
    assert "FSDP: 2 units" in proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert any(r["split"] == "eval" and "val_loss" in r for r in rows)
    final = LlavaModel.from_pretrained(run / "final")
    trained = load_file(str(run / WEIGHTS_NAME))
    for key, value in final.state_dict().items():
        assert torch.equal(value, trained[key]), key
