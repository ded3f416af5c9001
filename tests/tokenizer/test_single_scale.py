"""Single-scale TokenFlow (issue 24): one scale at the final grid, no multi-scale residual
quantization. The recipes differ from their multi-scale bases only in the scale schedule, and a
single-scale toy tokenizer goes through every command the multi-scale ones do, except the
next-scale generator, which refuses it in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenflow_cli.cli.app import app
from tokenflow_cli.config import load_recipe
from tokenflow_cli.tokenizer.config import TokenizerRecipe

PAIRS = [("shapes-toy-single", "shapes-toy"), ("clipb-256-single", "clipb-256"), ("siglip-384-single", "siglip-384")]


@pytest.mark.parametrize(("single", "multi"), PAIRS)
def test_single_recipe_is_its_base_with_one_scale_at_the_final_grid(single: str, multi: str) -> None:
    s, m = load_recipe(single, TokenizerRecipe), load_recipe(multi, TokenizerRecipe)
    assert tuple(s.model.quantizer.scales) == (m.model.quantizer.scales[-1],)
    assert s.model.name == single
    same_quantizer = dataclasses.replace(s.model.quantizer, scales=m.model.quantizer.scales)
    assert dataclasses.replace(s.model, name=m.model.name, quantizer=same_quantizer) == m.model
    assert (s.data, s.train) == (m.data, m.train)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tokenflow_cli.data.shapes import render_shapes_world

    root = tmp_path_factory.mktemp("single")
    render_shapes_world(root / "shapes", 12, seed=0, size=32, llava=True)
    return root


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def single_run(world):
    run = world / "tok"
    _ok(["train-tokenizer", "shapes-toy-single", "-o", str(run), "--set", f"data.train={world / 'shapes' / 'images'}",
         "--set", "data.val_limit=4", "--set", "train.steps=2", "--set", "train.batch_size=4",
         "--set", "train.eval_every=2"])
    return run


def test_single_scale_toy_trains_tokenizes_reconstructs_and_evaluates(world, single_run) -> None:
    from tokenflow_cli.tokenizer.codes import read_codes

    codes = world / "codes.npz"
    _ok(["tokenize", str(world / "shapes" / "images"), "-o", str(codes), "--model", str(single_run)])
    f = read_codes(codes)
    assert tuple(f.scales) == (8,) and f.indices.shape == (12, 64)
    assert f.indices.dtype == np.int32 and 0 <= f.indices.min() and f.indices.max() < 512
    assert "8x8" in CliRunner().invoke(app, ["codes", "info", str(codes)]).output

    _ok(["reconstruct", str(codes), "-o", str(world / "rec"), "--model", str(single_run)])
    assert len(list((world / "rec").glob("*.png"))) >= 12
    _ok(["eval", "usage", "--model", str(single_run), "--data", str(world / "shapes" / "images"),
         "-o", str(world / "usage")])
    per_scale = json.loads((world / "usage" / "report.json").read_text())["views"]["shared"]["per_scale"]
    assert len(per_scale) == 1


def test_single_scale_toy_feeds_finetune_llava(world, single_run) -> None:
    from tokenflow_cli.understanding.pipeline import Understanding

    run = world / "llava"
    _ok(["finetune-llava", "llava-toy", "--stage", "1", "-o", str(run), "--set", f"model.tokenizer={single_run}",
         "--set", f"data.train={world / 'shapes' / 'llava.json'}", "--set", "data.val=", "--set", "stage1.steps=2",
         "--set", "train.batch_size=4", "--set", "model.tiny_llm.num_layers=1",
         "--set", "model.tiny_llm.vocab_size=300"])
    vlm = Understanding.from_pretrained(run)
    assert vlm.model.num_visual_tokens == vlm.features.num_tokens == 64
    assert tuple(vlm.features.tokenizer.scales) == (8,)


def test_the_generator_refuses_a_single_scale_tokenizer_in_one_line(world, single_run, cli_error) -> None:
    codes = world / "gen-codes.npz"
    _ok(["tokenize", str(world / "shapes" / "images"), "-o", str(codes), "--model", str(single_run)])
    out = world / "gen"
    res = CliRunner().invoke(app, ["train-generator", "generator-toy", "-o", str(out), "--device", "cpu",
                                   "--set", f"data.tokenizer={single_run}", "--set", f"data.codes={codes}",
                                   "--set", f"data.captions={world / 'shapes' / 'captions.jsonl'}"])
    line = cli_error(res, "one scale (8 x 8)", "next-scale")
    assert "multi-scale tokenizer" in line
    assert not out.exists()
