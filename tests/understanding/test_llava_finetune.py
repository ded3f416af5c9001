"""`finetune-llava` on the shared loop: stage 1 freezes the LLM, stage 2 trains it, resume is exact,
and the tiny pipeline (shapes world -> tiny tokenizer -> tiny LM -> eval vqa) runs end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tokenflow_cli.config import to_dict
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.understanding.config import LlavaDataConfig, LlavaModelConfig, LlavaRecipe, TinyLMConfig
from tokenflow_cli.understanding.stage import finetune_llava


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> LlavaRecipe:
    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.config import TrainConfig, load_recipe
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.tokenizer.model import build_tokenizer

    root = tmp_path_factory.mktemp("llava_ft")
    render_shapes_world(root / "shapes", 6, seed=0, size=64, llava=True)
    render_shapes_world(root / "held_out", 2, seed=1, size=64, llava=True)
    torch.manual_seed(0)
    cfg = load_recipe("tiny", TokenizerRecipe).model
    save_model(build_tokenizer(cfg), root / "tok.safetensors", cfg, kind="tokenizer")
    lm = TinyLMConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=320,
        vocab_size=300,
    )
    return LlavaRecipe(
        model=LlavaModelConfig(tokenizer=str(root / "tok.safetensors"), tiny_llm=lm, max_length=320),
        data=LlavaDataConfig(
            train=str(root / "shapes" / "llava.json"), val=str(root / "held_out" / "llava.json"), val_limit=4
        ),
        train=TrainConfig(
            steps=4, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0, checkpoint_every=1, seed=0
        ),
    )


def lm_and_projector(folder) -> tuple[dict, dict]:
    state = load_file(str(folder / "model.safetensors"))
    lm = {k: v for k, v in state.items() if k.startswith("lm.")}
    return lm, {k: v for k, v in state.items() if k.startswith("projector.")}


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_stage1_freezes_the_llm_and_stage2_trains_it(recipe, tmp_path) -> None:
    s1 = tmp_path / "s1"
    result, final = finetune_llava(
        dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=2)), 1, s1, device="cpu", live=False
    )
    assert result.step == 2 and final == s1 / "final"
    (lm1, proj1), (lm2, proj2) = (lm_and_projector(s1 / "checkpoints" / f"step-{i:08d}") for i in (1, 2))
    assert not changed(lm1, lm2) and changed(proj1, proj2)

    s2 = tmp_path / "s2"
    stage2 = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, init=str(s1)), train=dataclasses.replace(recipe.train, steps=1)
    )
    finetune_llava(stage2, 2, s2, device="cpu", live=False)
    lm3, proj3 = lm_and_projector(s2 / "checkpoints" / f"step-{1:08d}")
    assert changed(lm2, lm3) and changed(proj2, proj3)  # started from stage 1's weights, both trained
    info = json.loads((s2 / "final" / "llava.json").read_text())
    assert info["stage"] == 2 and info["tokenizer_source"].endswith("tok.safetensors")


def test_resume_matches_an_uninterrupted_run(recipe, tmp_path) -> None:
    finetune_llava(recipe, 1, tmp_path / "full", device="cpu", live=False)
    half = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=2))
    finetune_llava(half, 1, tmp_path / "resumed", device="cpu", live=False)
    finetune_llava(recipe, 1, tmp_path / "resumed", device="cpu", live=False)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_tiny_pipeline_end_to_end_through_the_cli(recipe, tmp_path) -> None:
    from tokenflow_cli.cli.app import app

    recipe_file = tmp_path / "llava.yaml"
    tree = to_dict(recipe)
    tree["train"].update(steps=3, eval_every=3)
    recipe_file.write_text(yaml.safe_dump(tree))
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["finetune-llava", str(recipe_file), "--stage", "1", "-o", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (run / "final" / "projector.safetensors").is_file()
    assert "val_accuracy" in (run / "metrics.jsonl").read_text()
    questions = recipe.data.val.replace("llava.json", "vqa.jsonl")
    res = runner.invoke(
        app,
        [
            "eval",
            "vqa",
            "--data",
            questions,
            "--model",
            str(run),
            "-o",
            str(tmp_path / "ev"),
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n"] > 0 and set(report["per_type"]) >= {"count", "color", "background"}
    assert report["model"].endswith("final")


@pytest.mark.slow
def test_stage2_under_torchrun_with_two_cpu_processes(recipe, tmp_path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    recipe_file = tmp_path / "llava.yaml"
    tree = to_dict(recipe)
    tree["train"].update(steps=2, batch_size=2)
    recipe_file.write_text(yaml.safe_dump(tree))
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "tokenflow_cli",
            "finetune-llava",
            str(recipe_file),
            "--stage",
            "2",
            "-o",
            str(run),
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r.get("split") == "train") == 2
    lm_before, _ = lm_and_projector(run / "checkpoints" / f"step-{1:08d}")
    lm_after, _ = lm_and_projector(run / "checkpoints" / f"step-{2:08d}")
    assert changed(lm_before, lm_after) and (run / "final" / "config.json").is_file()
