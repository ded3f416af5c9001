"""`tokenflow convert`: fabricated official checkpoints -> our safetensors -> load_tokenizer.

Reduced-size official layouts (same structure, tiny widths) run the whole path on CPU in
seconds and are checked against an independent reference of the official encode
(convert_reference.py, written from tests/data/official_layout.md); full-size layouts are checked
on the meta device, and a full-size file conversion is a slow test.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import tempfile
from pathlib import Path

import pytest
import torch
from convert_reference import (
    CLIPB_224,
    CLIPB_224_ENHANCED,
    SIGLIP_384,
    OfficialSpec,
    fabricate,
    official_layout,
    ref_decode_pixels,
    ref_decode_semantic,
    ref_features,
    ref_indices_to_features,
    reference_encode,
)

from tokenflow_cli.tokenizer.config import (
    ModelConfig,
    PixelConfig,
    QuantizerConfig,
    SemanticDecoderConfig,
    SemanticEncoderConfig,
    TeacherConfig,
)
from tokenflow_cli.tokenizer.convert import (
    ConversionError,
    apply_file_sizes,
    convert_checkpoint,
    convert_state_dict,
    guess_variant,
    official_to_ours,
    variant_config,
)
from tokenflow_cli.tokenizer.model import load_tokenizer

OFFICIAL = Path(__file__).resolve().parents[1] / "data"  # key tables copied from the official release notes
FULL = {
    "clipb-224": (CLIPB_224, "tokenflow_clipb224_keys.tsv", 181_902_251),
    "clipb-256-enhanced": (CLIPB_224_ENHANCED, "tokenflow_clipb224_enhanced_keys.tsv", 376_569_643),
    "siglip-384": (SIGLIP_384, "tokenflow_siglip384_keys.tsv", 554_009_963),
}

# ---------------------------------------------------------------------------- reduced variants

CLIP_TOWER = "tokenflow-convert-test-vit"  # open_clip config: 14x14 positions, run at 16x16
SIGLIP_TOWER = "siglip-convert-test"  # 3 layers (features = layer 1), 13x13 grid, 54 px input

SMALL_CLIP = OfficialSpec(
    ch=16, ch_mult=(1, 2, 2), enc_res=2, dec_ch=32, dec_res=2, z=32, codebook=64, width=64, layers=2, heads=2,
    mlp=256, patch=4, tower_grid=14, dec_width=48, dec_depth=1, dec_heads=2, dec_mlp=192, dec_grid=14,
    teacher_dim=24, groups=8, scales=(1, 2, 4, 6, 8, 10, 12, 14, 16), image_size=64,
)  # fmt: skip
SMALL_SIGLIP = OfficialSpec(
    tower="siglip", ch=16, ch_mult=(1, 1, 2, 2), enc_res=2, dec_ch=16, dec_res=2, z=32, codebook=64, width=64,
    layers=3, heads=2, mlp=176, patch=4, tower_grid=13, dec_width=64, dec_depth=1, dec_heads=2, dec_mlp=256,
    dec_grid=13, teacher_dim=64, groups=8, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13), image_size=54, pixel_size=104,
)  # fmt: skip


def _small_config(s: OfficialSpec) -> ModelConfig:
    clip = s.tower == "clip"
    return ModelConfig(
        name=f"small-{s.tower}",
        image_size=s.image_size,
        pixel_input_size=s.pixel_size,
        pixel=PixelConfig(
            base_channels=s.ch,
            channel_mult=s.ch_mult,
            encoder_res_blocks=s.enc_res,
            decoder_base_channels=s.dec_ch,
            decoder_res_blocks=s.dec_res,
            z_channels=s.z,
            norm_groups=s.groups,
        ),  # fmt: skip
        semantic_encoder=SemanticEncoderConfig(
            backend="open_clip" if clip else "hf_siglip",
            model_name=CLIP_TOWER if clip else SIGLIP_TOWER,
            native_size=s.tower_grid * s.patch,
            feature_layer=-1 if clip else -2,
            input_norm="none" if clip else "clamp",
            quick_gelu=clip,
        ),
        teacher=TeacherConfig(dim=s.teacher_dim),
        quantizer=QuantizerConfig(codebook_size=s.codebook, scales=s.scales, search_chunk_size=24),
        semantic_decoder=SemanticDecoderConfig(
            width=s.dec_width, depth=s.dec_depth, heads=s.dec_heads, grid_size=s.dec_grid
        ),
    )


@pytest.fixture
def small_towers(monkeypatch):
    """Register the reduced towers (open_clip config file, SigLIP preset) for this test."""
    import open_clip

    from tokenflow_cli.tokenizer import semantic_towers

    if CLIP_TOWER not in open_clip.list_models():
        vision = {"image_size": 56, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4}
        text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{CLIP_TOWER}.json"
            path.write_text(json.dumps({"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}))
            open_clip.add_model_config(path)
    preset = dict(semantic_towers.SIGLIP_PRESETS["siglip-tiny"], num_hidden_layers=3, intermediate_size=176,
                  image_size=52)
    monkeypatch.setitem(semantic_towers.SIGLIP_PRESETS, SIGLIP_TOWER, preset)


def _save_official(path: Path, sd: dict, **extra) -> Path:
    """As the official training script saves: state dict, pickled args, steps, optimizer."""
    args = argparse.Namespace(teacher="clipb_224", codebook_size=64, infer_interpolate=True)
    torch.save({"model": sd, "args": args, "steps": 1, "optimizer": {"state": {}}, **extra}, path)
    return path


def _images(s: OfficialSpec, n: int = 2, seed: int = 1) -> torch.Tensor:
    # a little outside [-1, 1] so SigLIP's clamp matters
    return torch.rand(n, 3, s.image_size, s.image_size, generator=torch.Generator().manual_seed(seed)) * 2.2 - 1.1


# ------------------------------------------------------------------------- layouts, full size


@pytest.mark.parametrize("variant", sorted(FULL))
def test_layout_generator_reproduces_official_listing(variant):
    spec, tsv, _ = FULL[variant]
    with open(OFFICIAL / tsv) as fh:
        rows = [
            (r["key"], tuple(int(x) for x in r["shape"].split("x")), r["kind"])
            for r in csv.DictReader(fh, delimiter="\t")
        ]
    assert official_layout(spec) == rows  # keys, shapes, kinds and order


@pytest.mark.parametrize("variant", sorted(FULL))
def test_full_size_layout_maps_completely_on_meta(variant):
    spec, _, total = FULL[variant]
    official = fabricate(spec, device="meta")
    assert guess_variant(official)[0] == variant
    ours, notes = convert_state_dict(official, variant_config(variant))
    assert sum(v.numel() for v in ours.values() if v.is_floating_point()) == total
    assert len(ours) == len(official) - 1 - 2 * (spec.tower == "siglip") + 3  # codebook_used, scaling; + 3 fresh
    if spec.tower == "siglip":
        assert any("layers 26..26" in n and "30,480,160" in n for n in notes)
        assert any("stored, not needed" in n for n in notes)


def test_sizes_come_from_the_file_and_a_given_recipe_must_agree():
    spec = dataclasses.replace(CLIPB_224_ENHANCED, codebook=64)  # an official build with K = 64
    official = fabricate(spec, device="meta")
    variant = guess_variant(official)[0]
    cfg, notes = apply_file_sizes(variant_config(variant), official, explicit=False)
    assert cfg.quantizer.codebook_size == 64 and "from the file" in notes[0] and "says 32768" in notes[0]
    ours, _ = convert_state_dict(official, cfg)
    assert ours["quantizer.semantic_codebook.weight"].shape == (64, 32)
    with pytest.raises(ConversionError, match=r"codebook_size=32768 in the recipe, 64 in the file"):
        apply_file_sizes(variant_config(variant), official, explicit=True)


def test_variant_guess_needs_known_decoder_width():
    official = fabricate(CLIPB_224, device="meta")
    official["decoder.conv_out.weight"] = torch.empty(3, 64, 3, 3, device="meta")
    with pytest.raises(ConversionError, match="--variant"):
        guess_variant(official)


# ------------------------------------------------------------------ reduced: files and parity


def _convert_small(tmp_path: Path, spec: OfficialSpec, official: dict):
    src = _save_official(tmp_path / "official.pt", official)
    report = convert_checkpoint(src, tmp_path / "ours.safetensors", config=_small_config(spec))
    return report, load_tokenizer(tmp_path / "ours.safetensors")


SMALL = pytest.mark.parametrize("spec", [SMALL_CLIP, SMALL_SIGLIP], ids=["clipb-style", "siglip-style"])


@SMALL
def test_reduced_conversion_places_every_tensor(tmp_path, small_towers, spec):
    official = fabricate(spec, seed=3)
    official["quantize.embedding_vqkd.weight"][5, 3] = 123.25
    report, tok = _convert_small(tmp_path, spec, official)
    assert report.entry == "model" and "args" in report.other_entries and report.steps == 1
    assert set(report.not_carried) == {k for k in official if k.startswith(("quantize.codebook_used", "scaling_layer"))}
    ours = tok.state_dict()
    for key, value in official.items():  # every official tensor arrived where it belongs
        if official_to_ours(key) is not None and not key.startswith("scaling_layer"):
            assert torch.equal(ours[official_to_ours(key)], value), key
    assert float(tok.quantizer.semantic_codebook.weight.detach()[5, 3]) == 123.25
    assert torch.equal(tok.pixel_decoder.conv_out.weight, official["decoder.conv_out.weight"])
    assert torch.equal(tok.semantic_head[2].bias, official["decode_task_layer.2.bias"])
    if spec.tower == "siglip":
        key = "encoder_vqkd.vision_model.encoder.layers.2.mlp.fc1.bias"
        assert torch.equal(tok.semantic_encoder.tower.encoder.layers[2].mlp.fc1.bias, official[key])
    else:
        key = "encoder_vqkd.positional_embedding"
        assert torch.equal(tok.semantic_encoder.tower.positional_embedding, official[key])


@SMALL
@torch.no_grad()
def test_reduced_converted_model_reproduces_official_encode(tmp_path, small_towers, spec):
    official = fabricate(spec, seed=3)
    _, tok = _convert_small(tmp_path, spec, official)
    img = _images(spec)
    sd64 = {k: v.double() for k, v in official.items()}
    ref_f = ref_features(sd64, img.double(), spec)
    torch.testing.assert_close(tok.encode_features(img), ref_f.float(), atol=2e-5, rtol=0)  # the fp32 path
    ref_idx, margin = reference_encode(sd64, img.double(), spec)
    # Indices: our model in fp64 (its quantizer still searches in fp32, error << 1e-5) so that
    # a near-tie cannot flip a choice; the margin check keeps the comparison meaningful.
    tok.double()
    # position tables are resized in fp32 by design, hence 5e-6 and not 1e-12
    torch.testing.assert_close(tok.encode_features(img.double()), ref_f, atol=5e-6, rtol=0)
    ours_idx = tok.img_to_codes(img.double()).indices
    assert margin > 1e-5, "fixture too close to a tie for the fp32 codebook search"
    assert ours_idx.shape == (2, sum(s * s for s in spec.scales))
    assert torch.equal(ours_idx, ref_idx)


@SMALL
@torch.no_grad()
def test_reduced_converted_model_reproduces_official_decode(tmp_path, small_towers, spec):
    official = fabricate(spec, seed=4)
    _, tok = _convert_small(tmp_path, spec, official)
    tok.double()
    sd64 = {k: v.double() for k, v in official.items()}
    idx = torch.randint(
        0, spec.codebook, (2, sum(s * s for s in spec.scales)), generator=torch.Generator().manual_seed(0)
    )
    f = tok.codes_to_features(idx)
    torch.testing.assert_close(f, ref_indices_to_features(sd64, idx, spec), atol=1e-10, rtol=0)
    img = tok.features_to_img(f)
    assert img.shape == (2, 3, spec.image_size, spec.image_size)
    torch.testing.assert_close(img, ref_decode_pixels(sd64, f, spec), atol=1e-8, rtol=0)
    torch.testing.assert_close(tok.features_to_semantic(f), ref_decode_semantic(sd64, f, spec), atol=1e-5, rtol=0)


def test_ema_wins_then_model_then_state_dict_and_module_prefix_is_stripped(tmp_path, small_towers):
    cfg = _small_config(SMALL_CLIP)
    model_sd, ema_sd = fabricate(SMALL_CLIP, seed=1), fabricate(SMALL_CLIP, seed=2)
    src = _save_official(tmp_path / "a.pt", model_sd, ema={f"module.{k}": v for k, v in ema_sd.items()})
    report = convert_checkpoint(src, tmp_path / "a.safetensors", config=cfg)
    assert report.entry == "ema" and report.stripped_module_prefix == len(ema_sd)
    assert torch.equal(load_tokenizer(tmp_path / "a.safetensors").quant_conv.weight, ema_sd["quant_conv.weight"])

    torch.save({"state_dict": model_sd}, tmp_path / "b.pt")
    assert convert_checkpoint(tmp_path / "b.pt", tmp_path / "b.safetensors", config=cfg).entry == "state_dict"
    torch.save(model_sd, tmp_path / "c.pt")
    assert convert_checkpoint(tmp_path / "c.pt", tmp_path / "c.safetensors", config=cfg).entry == "bare state dict"


def test_refuses_any_pickled_class_but_namespace(tmp_path, small_towers):
    sd = fabricate(SMALL_CLIP)
    torch.save({"model": sd, "args": pathlib.PurePosixPath("/x")}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="PurePosixPath"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "x.safetensors", config=_small_config(SMALL_CLIP))
    assert not (tmp_path / "x.safetensors").exists()


def test_lists_every_problem_on_both_sides(small_towers):
    sd = fabricate(SMALL_CLIP)
    sd["encoder.extra_thing.weight"] = torch.zeros(2)
    del sd["decoder_vqkd.fc_norm.bias"]
    sd["quant_conv.bias"] = torch.zeros(9)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(sd, _small_config(SMALL_CLIP))
    msg = str(err.value)
    assert "encoder.extra_thing.weight" in msg and "semantic_decoder.fc_norm.bias" in msg
    assert "quant_conv.bias: (9,)" in msg


def test_scaling_layer_and_parity_switches_are_checked(small_towers):
    sd = fabricate(SMALL_SIGLIP)
    cfg = _small_config(SMALL_SIGLIP)
    sd["scaling_layer.shift"] = torch.full((1, 3, 1, 1), 0.4)
    with pytest.raises(ConversionError, match="scaling_layer values"):
        convert_state_dict(sd, cfg)
    sd["scaling_layer.shift"] = torch.full((1, 3, 1, 1), 0.5)
    bad = dataclasses.replace(cfg, semantic_encoder=dataclasses.replace(cfg.semantic_encoder, feature_layer=-1))
    with pytest.raises(ConversionError, match="feature_layer"):
        convert_state_dict(sd, bad)


def test_dtype_option_casts_floats_only(small_towers):
    ours, _ = convert_state_dict(fabricate(SMALL_CLIP), _small_config(SMALL_CLIP), dtype="bfloat16")
    assert ours["quant_conv.weight"].dtype == torch.bfloat16
    assert ours["quantizer.usage_counts"].dtype == torch.long


def test_cli_convert(tmp_path, small_towers, cli_error):
    import yaml
    from typer.testing import CliRunner

    from tokenflow_cli.cli.app import app
    from tokenflow_cli.config import to_dict

    src = _save_official(tmp_path / "official.pt", fabricate(SMALL_SIGLIP))
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({"model": to_dict(_small_config(SMALL_SIGLIP))}))
    out = tmp_path / "ours.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # Rich wraps at the runner's terminal width
    assert "entry model" in text and "stored, not needed" in text and "not carried: quantize.codebook_used" in text
    assert load_tokenizer(out).config.name == "small-siglip"
    bad = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "y.safetensors")])
    bad_text = " ".join(bad.output.split())
    assert bad.exit_code != 0 and "as variant siglip-384" in bad_text  # guessed; the full-size shapes differ
    cli_error(bad, src, "as variant siglip-384", "cannot convert", code=1)

    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (70 + i * 30, 60), (40 * i, 120, 200)).save(images / f"{i}.png")
    codes = tmp_path / "codes.npz"
    tok_run = CliRunner().invoke(
        app, ["tokenize", str(images), "-o", str(codes), "--model", str(out), "--device", "cpu"]
    )
    assert tok_run.exit_code == 0, tok_run.output
    from tokenflow_cli.tokenizer.codes import read_codes

    assert read_codes(codes).indices.shape == (2, sum(s * s for s in SMALL_SIGLIP.scales))


# ------------------------------------------------------------------------------ slow: full file


@pytest.mark.slow
def test_cli_converts_and_encodes_an_official_k64_file_without_a_recipe(tmp_path):
    from typer.testing import CliRunner

    from tokenflow_cli.cli.app import app

    official = fabricate(dataclasses.replace(CLIPB_224, codebook=64), seed=0)
    src = _save_official(tmp_path / "tokenflow_clipb_64.pt", official)
    del official
    out = tmp_path / "ours.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "codebook_size = 64 from the file" in " ".join(result.output.split())
    tok = load_tokenizer(out)
    indices = tok.img_to_codes(torch.rand(2, 3, 224, 224) * 2 - 1).indices
    assert indices.shape == (2, 561) and int(indices.max()) < 64


@pytest.mark.slow
def test_full_size_clipb224_file_round_trip(tmp_path):
    official = fabricate(CLIPB_224, seed=0)
    official["encode_task_layer.2.bias"][7] = 42.0
    src = _save_official(tmp_path / "tokenflow_clipb224.pt", official)
    del official
    report = convert_checkpoint(src, tmp_path / "ours.safetensors")
    assert report.variant == "clipb-224" and report.parameters == FULL["clipb-224"][2]
    tok = load_tokenizer(tmp_path / "ours.safetensors")
    assert float(tok.semantic_proj[2].bias.detach()[7]) == 42.0
    assert tok.img_to_codes(torch.zeros(1, 3, 224, 224)).indices.shape == (1, 561)
