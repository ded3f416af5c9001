import dataclasses

import pytest
import torch

from tokenflow_cli.checkpoint import save_model
from tokenflow_cli.config import load_recipe
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import MultiScaleCodes, build_tokenizer, load_tokenizer


def _images(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "name,tokens,params",
    [("clipb-224", 561, 181_902_251), ("clipb-256", 817, 376_569_643), ("siglip-384", 2227, 554_009_963)],
)
def test_paper_recipes_token_counts_on_meta(name, tokens, params):
    model = load_recipe(name, TokenizerRecipe).model
    model = dataclasses.replace(model, semantic_encoder=dataclasses.replace(model.semantic_encoder, pretrained=""))
    with torch.device("meta"):
        tok = build_tokenizer(model)
    assert tok.num_tokens == tokens
    # the official parameter totals (tests/data/official_layout.md) are held exactly
    assert sum(p.numel() for p in tok.parameters()) == params


def test_per_scale_shapes(tiny_tokenizer):
    codes = tiny_tokenizer.img_to_codes(_images())
    assert codes.indices.shape == (2, tiny_tokenizer.num_tokens) and codes.indices.dtype == torch.long
    assert [c.shape for c in codes.per_scale()] == [(2, s, s) for s in tiny_tokenizer.scales]
    assert int(codes.indices.max()) < tiny_tokenizer.codebook_size


@torch.no_grad()
def test_decode_of_encode_equals_eval_forward(tiny_tokenizer):
    x = _images()
    out = tiny_tokenizer(x)
    rec = tiny_tokenizer.codes_to_img(tiny_tokenizer.img_to_codes(x))
    assert torch.equal(out.codes.indices, tiny_tokenizer.img_to_codes(x).indices)
    assert torch.allclose(rec, out.reconstruction, atol=1e-4)
    assert torch.allclose(tiny_tokenizer.codes_to_features(out.codes), out.quantized, atol=1e-5)


@torch.no_grad()
def test_feature_views(tiny_tokenizer):
    codes = tiny_tokenizer.img_to_codes(_images())
    f = tiny_tokenizer.codes_to_features(codes)
    g = tiny_tokenizer.grid
    assert f.shape == (2, 40, g, g)
    assert torch.equal(tiny_tokenizer.codes_to_semantic_features(codes), f[:, :32])
    assert torch.equal(tiny_tokenizer.codes_to_pixel_features(codes), f[:, 32:])
    inputs = tiny_tokenizer.next_scale_inputs(codes)
    assert [x.shape[1] for x in inputs] == [s * s for s in tiny_tokenizer.scales[1:]]
    assert tiny_tokenizer.lookup_codes(codes.indices[:, :3]).shape == (2, 3, 40)


def test_training_forward_gives_gradients_everywhere(tiny_recipe):
    torch.manual_seed(0)
    tok = build_tokenizer(
        dataclasses.replace(
            tiny_recipe.model, quantizer=dataclasses.replace(tiny_recipe.model.quantizer, scale_drop_prob=0.0)
        )
    ).train()
    out = tok(_images())
    loss = out.reconstruction.square().mean() + out.semantic_pred.square().mean() + out.codebook_loss + out.commit_loss
    loss.backward()
    missing = [n for n, p in tok.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing


def test_checkpoint_round_trip_rebuilds_from_file_alone(tiny_tokenizer, tmp_path):
    path = tmp_path / "run" / "model.safetensors"
    save_model(tiny_tokenizer, path, tiny_tokenizer.config)
    loaded = load_tokenizer(tmp_path / "run")
    assert loaded.config == tiny_tokenizer.config
    for (k, a), (k2, b) in zip(tiny_tokenizer.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded.img_to_codes(x).indices, tiny_tokenizer.img_to_codes(x).indices)
    assert not loaded.random_init_parts


def test_not_a_tokenizer_checkpoint_is_refused(tmp_path):
    from tokenflow_cli.checkpoint import save_weights

    save_weights({"x": torch.zeros(1)}, tmp_path / "other.safetensors", {}, kind="generator")
    with pytest.raises(ValueError, match="is a generator checkpoint .*a tokenizer checkpoint is needed"):
        load_tokenizer(tmp_path / "other.safetensors")


def test_multiscale_codes_per_scale_is_row_major():
    idx = torch.arange(1 + 4 + 16).unsqueeze(0)
    views = MultiScaleCodes(idx, (1, 2, 4)).per_scale()
    assert views[1].tolist() == [[[1, 2], [3, 4]]]
    assert views[2][0, 1].tolist() == [9, 10, 11, 12]


def test_semantic_off_ablation_runs(tiny_recipe):
    model = dataclasses.replace(
        tiny_recipe.model, quantizer=dataclasses.replace(tiny_recipe.model.quantizer, use_semantic=False)
    )
    tok = build_tokenizer(model).eval()
    out = tok(_images())
    assert out.semantic_pred is None and out.features[:, :32].abs().sum() == 0
