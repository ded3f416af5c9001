"""Feature sources by scale (issue 24): `final`, `all` (running sums per scale) and `residual`
(each scale's own codes) tie together, load from recipes, and survive a finetune -> save ->
reload -> eval vqa round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tokenflow_cli.config import ConfigError, load_recipe, to_dict
from tokenflow_cli.understanding.config import LlavaModelConfig, LlavaRecipe, validate

TOY_SCALES = (1, 2, 3, 4, 6, 8)  # shapes-toy: final grid 8 x 8, 130 tokens


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer

    torch.manual_seed(0)
    cfg = load_recipe("shapes-toy", TokenizerRecipe).model
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_model(build_tokenizer(cfg), path, cfg, kind="tokenizer")
    return path


@pytest.fixture(scope="module")
def tok(tok_file):
    from tokenflow_cli.tokenizer.model import load_tokenizer

    return load_tokenizer(tok_file)


def test_final_all_and_residual_tie_together(tok) -> None:
    assert tok.scales == TOY_SCALES and tok.grid == 8
    q = tok.quantizer
    gen = torch.Generator().manual_seed(0)
    idx_BL = torch.randint(tok.codebook_size, (2, sum(s * s for s in TOY_SCALES)), generator=gen)
    final = tok.features(idx_BL)
    running, residual = tok.features(idx_BL, scales="all"), tok.features(idx_BL, scales="residual")
    assert final.shape == (2, 40, 8, 8)
    shapes = [(2, 40, s, s) for s in TOY_SCALES]
    assert [tuple(m.shape) for m in running] == [tuple(m.shape) for m in residual] == shapes
    summed = torch.zeros_like(final)
    for idx_Bl, s, res, run in zip(q.split_indices(idx_BL), TOY_SCALES, residual, running, strict=True):
        lookup = tok.lookup_codes(idx_Bl).transpose(1, 2).reshape(2, 40, s, s)
        torch.testing.assert_close(res, lookup, rtol=0, atol=0)  # residual: scale k's codebook lookup
        summed = summed + q.upsample(res, 8)
        torch.testing.assert_close(run, q.downsample(summed, s))  # all: the running sum at side s_k
    torch.testing.assert_close(summed, final)  # residual blocks upsampled and summed = final
    torch.testing.assert_close(running[-1], final)  # the last running sum is the final map
    with pytest.raises(ValueError, match="scales must be one of"):
        tok.features(idx_BL, scales="last")


@pytest.mark.parametrize("kind,dim", [("tokenflow", 40), ("semantic", 32), ("pixel", 8)])
def test_feature_sources_by_scale(tok, kind, dim) -> None:
    from tokenflow_cli.understanding.features import build_feature_source

    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    idx_BL = tok.img_to_codes(img).indices
    channels = slice(0, 32) if kind == "semantic" else slice(32, 40) if kind == "pixel" else slice(0, 40)
    for scales, n in (("final", 64), ("all", 130), ("residual", 130)):
        source = build_feature_source(tok, kind, scales=scales)
        assert (source.num_tokens, source.feature_dim) == (n, dim)
        maps = tok.features(idx_BL, scales=scales)
        maps = [maps] if scales == "final" else maps
        expected = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)[..., channels]
        torch.testing.assert_close(source(img), expected)
    last = build_feature_source(tok, kind, scales="all")(img)[:, -64:]
    torch.testing.assert_close(last, build_feature_source(tok, kind)(img))  # last block of all = final


def test_feature_source_rejects_scales_with_grid_or_teacher(tok) -> None:
    from tokenflow_cli.understanding.features import TokenizerFeatures

    with pytest.raises(ValueError, match="unknown feature scales"):
        TokenizerFeatures(tok, "tokenflow", scales="every")
    with pytest.raises(ValueError, match="feature_grid"):
        TokenizerFeatures(tok, "tokenflow", grid=4, scales="all")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.feature_scales=every"], "model.feature_scales: 'every' is not one of"),
        (["model.feature_scales=all", "model.features=teacher"], "'teacher' has no scales"),
        (["model.feature_scales=residual", "model.feature_grid=4"], "model.feature_grid: 4"),
    ],
)
def test_recipe_validation(overrides, message) -> None:
    recipe = load_recipe("llava-toy", LlavaRecipe, overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        validate(recipe)


def test_recipe_default_and_override() -> None:
    assert load_recipe("llava-toy", LlavaRecipe).model.feature_scales == "final"
    recipe = load_recipe("llava-toy", LlavaRecipe, overrides=["model.feature_scales=all"])
    validate(recipe)
    assert recipe.model.feature_scales == "all"


@pytest.fixture(scope="module")
def recipe(tok_file, tmp_path_factory) -> LlavaRecipe:
    from tokenflow_cli.config import TrainConfig
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.understanding.config import LlavaDataConfig, TinyLMConfig

    root = tmp_path_factory.mktemp("scales_ft")
    render_shapes_world(root / "shapes", 6, seed=0, size=32, llava=True)
    render_shapes_world(root / "held_out", 2, seed=1, size=32, llava=True)
    lm = TinyLMConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=256, vocab_size=300)
    return LlavaRecipe(
        model=LlavaModelConfig(tokenizer=str(tok_file), tiny_llm=lm, max_length=256, feature_scales="all"),
        data=LlavaDataConfig(train=str(root / "shapes" / "llava.json"), val=str(root / "held_out" / "llava.json")),
        train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0,
                          checkpoint_every=2, seed=0),
    )


def test_max_length_must_hold_the_visual_tokens(recipe, tmp_path) -> None:
    from tokenflow_cli.understanding.stage import finetune_llava

    short = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, max_length=128))
    with pytest.raises(ConfigError, match="model.max_length: 128 tokens cannot hold the 130 visual tokens"):
        finetune_llava(short, 1, tmp_path / "run", device="cpu", live=False)


def test_finetune_save_reload_and_eval_keep_the_scale_choice(recipe, tmp_path) -> None:
    from tokenflow_cli.cli.app import app
    from tokenflow_cli.understanding.build import load_llava
    from tokenflow_cli.understanding.pipeline import Understanding
    from tokenflow_cli.understanding.stage import finetune_llava

    recipe_file = tmp_path / "llava.yaml"
    tree = to_dict(dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, feature_scales="final")))
    recipe_file.write_text(yaml.safe_dump(tree))
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["finetune-llava", str(recipe_file), "--stage", "1", "-o", str(run), "--device", "cpu"]
    res = runner.invoke(app, [*args, "--set", "model.feature_scales=all"])
    assert res.exit_code == 0, res.output

    vlm = Understanding.from_pretrained(run)
    assert vlm.feature_scales == "all" and vlm.features.scales == "all"
    assert vlm.model.num_visual_tokens == vlm.features.num_tokens == 130
    questions = recipe.data.val.replace("llava.json", "vqa.jsonl")
    res = runner.invoke(app, ["eval", "vqa", "--data", questions, "--model", str(run), "-o", str(tmp_path / "ev"),
                              "--max-new-tokens", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["n"] > 0

    stage2 = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, init=str(run),
                                                                      feature_scales="residual"))
    with pytest.raises(ValueError, match="feature_scales=all.*feature_scales=residual"):
        finetune_llava(stage2, 2, tmp_path / "s2", device="cpu", live=False)

    info_path = run / "final" / "llava.json"  # a model saved before the field existed reads as final
    info = json.loads(info_path.read_text())
    del info["config"]["feature_scales"]
    info_path.write_text(json.dumps(info))
    assert load_llava(run / "final").config.feature_scales == "final"
