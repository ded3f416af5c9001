import pytest

from tokenflow_cli.config import ConfigError, list_recipes, load_recipe, to_yaml
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.scales import ScaleLayout


def test_paper_recipes_have_the_official_schedules():
    assert ScaleLayout(load_recipe("clipb-224", TokenizerRecipe).model.quantizer.scales).num_tokens == 561
    r256 = load_recipe("clipb-256", TokenizerRecipe)
    assert ScaleLayout(r256.model.quantizer.scales).num_tokens == 817
    assert r256.model.pixel.decoder_base_channels == 256 and r256.model.pixel.decoder_res_blocks == 5
    assert r256.model.semantic_encoder.model_name == "ViT-B-16"  # inherited through base:
    r384 = load_recipe("siglip-384", TokenizerRecipe)
    assert ScaleLayout(r384.model.quantizer.scales).num_tokens == 2227
    for name in ("clipb-224", "clipb-256", "siglip-384"):
        q = load_recipe(name, TokenizerRecipe).model.quantizer
        assert (q.codebook_size, q.semantic_dim, q.pixel_dim, q.pixel_weight) == (32768, 32, 8, 1.0)
    assert {"tiny", "clipb-224", "clipb-256", "siglip-384"} <= set(list_recipes())


def test_overrides_are_typed():
    r = load_recipe(
        "tiny",
        overrides=[
            "train.lr=3e-4",
            "model.quantizer.scales=1,2,4",
            "data.hflip=false",
            "train.steps=12.0",
            "model.quantizer.use_semantic=no",
        ],
    )
    assert r.train.lr == 3e-4 and isinstance(r.train.lr, float)
    assert r.model.quantizer.scales == (1, 2, 4)
    assert r.data.hflip is False and r.train.steps == 12 and isinstance(r.train.steps, int)
    assert r.model.quantizer.use_semantic is False


def test_unknown_key_names_key_file_and_nearest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny.yaml\nmodel:\n  quantizer:\n    codebok_size: 10\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(bad, TokenizerRecipe)
    msg = str(err.value)
    assert "bad.yaml" in msg and "model.quantizer" in msg and "codebok_size" in msg and "codebook_size" in msg


def test_wrong_type_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: lots\n")
    with pytest.raises(ConfigError, match=r"train.steps.*integer"):
        load_recipe(bad, TokenizerRecipe)
    with pytest.raises(ConfigError, match="--set.*train.lr"):
        load_recipe("tiny", TokenizerRecipe, overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_recipe("tiny", TokenizerRecipe, overrides=["train.batchsize=3"])


def test_base_inheritance_and_round_trip(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: clipb-224\nmodel:\n  image_size: 256\n")
    r = load_recipe(child, TokenizerRecipe)
    assert r.model.image_size == 256 and r.model.quantizer.codebook_size == 32768
    again = tmp_path / "resolved.yaml"
    again.write_text(to_yaml(r))
    assert load_recipe(again, TokenizerRecipe) == r
    assert isinstance(r, TokenizerRecipe)


def test_missing_recipe_lists_known():
    with pytest.raises(ConfigError, match="tiny"):
        load_recipe("no-such-recipe", TokenizerRecipe)
