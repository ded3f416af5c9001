"""Semantic towers, teacher and semantic decoder: shapes, library equivalence, official layouts."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenflow_cli.tokenizer.config import SemanticDecoderConfig, SemanticEncoderConfig, TeacherConfig
from tokenflow_cli.tokenizer.semantic import (
    CLIP_MEAN,
    CLIP_STD,
    INPUT_NORMS,
    SemanticEncoder,
    Teacher,
    load_teacher_state_into_encoder,
)
from tokenflow_cli.tokenizer.semantic_decoder import BeitAttention, SemanticDecoder, resize_patch_positions, task_layer
from tokenflow_cli.tokenizer.semantic_towers import register_tiny_open_clip, tower_backend
from tokenflow_cli.weights import MissingWeightsError

OFFICIAL = Path(__file__).resolve().parents[1] / "data"  # key tables copied from the official release notes

TINY_CLIP = SemanticEncoderConfig(
    backend="open_clip", model_name="tokenflow-tiny-vit", native_size=64, input_norm="clip_mean_std"
)
TINY_SIGLIP = SemanticEncoderConfig(
    backend="hf_siglip", model_name="siglip-tiny", native_size=64, feature_layer=-2, input_norm="clamp"
)
TINY_CLIP_TEACHER = TeacherConfig(model_name="tokenflow-tiny-vit", feature="proj_tokens", dim=64)


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1


def _official_rows(tsv: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    path = OFFICIAL / tsv
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["key"].startswith(prefix)]
    return [(r["key"][len(prefix) :], tuple(int(d) for d in r["shape"].split("x"))) for r in rows]


def _layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ---------------------------------------------------------------------------------- towers


@pytest.mark.parametrize("cfg", [TINY_CLIP, TINY_SIGLIP], ids=["open_clip", "hf_siglip"])
def test_tiny_towers_give_16x16_grid_at_64px(cfg):
    torch.manual_seed(0)
    enc = SemanticEncoder(cfg, 64)
    f_BDhw = enc(_images(64))
    assert f_BDhw.shape == (2, 64, 16, 16)
    assert (enc.width, enc.patch_size, enc.grid_size(64), enc.random_init) == (64, 4, 16, True)
    assert torch.isfinite(f_BDhw).all()


def test_tiny_open_clip_registration_is_idempotent():
    import open_clip

    assert register_tiny_open_clip() == register_tiny_open_clip() == "tokenflow-tiny-vit"
    assert open_clip.list_models().count("tokenflow-tiny-vit") == 1
    text_cfg = open_clip.get_model_config("tokenflow-tiny-vit")["text_cfg"]
    assert text_cfg["vocab_size"] == 49408  # open_clip's shipped tokenizer must still fit


def test_open_clip_tokens_match_library_forward_at_native_size():
    torch.manual_seed(0)
    teacher = Teacher(TINY_CLIP_TEACHER, TINY_CLIP)
    img = _images(64)
    tower = copy.deepcopy(teacher.tower)
    tower.output_tokens = True  # open_clip returns (pooled, ln_post(patch tokens)), unprojected
    _, tokens = tower(INPUT_NORMS["clip_mean_std"](img))
    torch.testing.assert_close(teacher(img), tokens @ tower.proj)

    enc = SemanticEncoder(TINY_CLIP, 64)
    inter = enc.tower.forward_intermediates(img, indices=[0], intermediates_only=True, output_fmt="NCHW")
    penultimate = enc.backend.tokens(enc.tower, img, feature_layer=-2)
    torch.testing.assert_close(penultimate.transpose(1, 2).reshape(2, 64, 16, 16), inter["image_intermediates"][0])


def test_siglip_tokens_match_hidden_states():
    torch.manual_seed(0)
    enc = SemanticEncoder(TINY_SIGLIP, 64)
    img = _images(64)
    out = enc.tower(pixel_values=img, output_hidden_states=True)
    torch.testing.assert_close(enc.tokens(img, feature_layer=-2), out.hidden_states[-2])
    torch.testing.assert_close(enc.tokens(img, feature_layer=-1), out.last_hidden_state)
    torch.testing.assert_close(enc(img).flatten(2).transpose(1, 2), out.hidden_states[-2])  # config: -2


def test_siglip_patch_stride_covers_floor_of_size():
    enc = SemanticEncoder(TINY_SIGLIP, 64)
    img = _images(66)
    torch.testing.assert_close(enc(img), enc(img[..., :64, :64]))  # 66 px: the last 2 px are unseen


def test_position_grid_is_interpolated_at_non_native_size():
    torch.manual_seed(0)
    teacher = Teacher(TINY_CLIP_TEACHER, TINY_CLIP)
    img = _images(80)
    assert SemanticEncoder(TINY_CLIP, 80)(img).shape == (2, 64, 20, 20)
    # Same as the library forward with the patch table resized by hand and the class row kept.
    tower = copy.deepcopy(teacher.tower)
    table = tower.positional_embedding.data
    tower.positional_embedding = torch.nn.Parameter(torch.cat([table[:1], resize_patch_positions(table[1:], 20, 20)]))
    tower.output_tokens = True
    _, tokens = tower(INPUT_NORMS["clip_mean_std"](img))
    torch.testing.assert_close(teacher(img), tokens @ tower.proj)


def test_resize_patch_positions_invariants():
    table = torch.randn(16 * 16, 8)
    assert resize_patch_positions(table, 16, 16) is table  # native grid: untouched
    official = F.interpolate(
        table.reshape(1, 16, 16, 8).permute(0, 3, 1, 2), scale_factor=(20.1 / 16, 20.1 / 16), mode="bicubic"
    )
    torch.testing.assert_close(resize_patch_positions(table, 20, 20), official.permute(0, 2, 3, 1).reshape(400, 8))
    constant = torch.full((16 * 16, 3), 0.7)
    torch.testing.assert_close(resize_patch_positions(constant, 20, 12), torch.full((240, 3), 0.7))
    columns = torch.arange(16.0).repeat(16).unsqueeze(1)  # varies along w only
    rows_hw = resize_patch_positions(columns, 20, 12).reshape(20, 12)
    torch.testing.assert_close(rows_hw, rows_hw[:1].expand(20, 12))
    assert torch.all(rows_hw[0, 1:] > rows_hw[0, :-1])  # still increasing along w


def test_input_norms():
    img = _images(8)
    assert INPUT_NORMS["none"](img) is img
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(INPUT_NORMS["clip_mean_std"](img), ((img + 1) / 2 - mean) / std)
    wide = img * 3
    torch.testing.assert_close(INPUT_NORMS["clamp"](wide), wide.clamp(-1, 1))
    with pytest.raises(ValueError, match="clip_mean_std"):
        SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "input_norm": "imagenet"}), 64)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="hf_siglip"):
        tower_backend("timm")
    with pytest.raises(ValueError, match=r"\[-2, -1\]"):
        SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "feature_layer": -3}), 64)
    with pytest.raises(ValueError, match="native_size"):
        SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "native_size": 224}), 64)
    with pytest.raises(ValueError, match="siglip-so400m"):
        SemanticEncoder(SemanticEncoderConfig(**{**TINY_SIGLIP.__dict__, "model_name": "siglip-huge"}), 64)
    with pytest.raises(ValueError, match="teacher.dim"):
        Teacher(TeacherConfig(model_name="tokenflow-tiny-vit", dim=512), TINY_CLIP)


def test_every_tower_parameter_gets_a_gradient_and_freezing_works():
    enc = SemanticEncoder(TINY_CLIP, 64)
    enc(_images(64)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    frozen = SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "trainable": False}), 64)
    assert not any(p.requires_grad for p in frozen.parameters())


# ---------------------------------------------------------------------------------- teacher


def test_teacher_is_frozen_and_outside_autograd():
    teacher = Teacher(TINY_CLIP_TEACHER, TINY_CLIP)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    img = _images(64).requires_grad_(True)
    target = teacher(img)
    assert target.shape == (2, 256, 64) and not target.requires_grad
    assert teacher.dim == 64 and teacher.random_init


def test_siglip_teacher_gives_penultimate_state():
    teacher = Teacher(
        TeacherConfig(backend="hf_siglip", model_name="siglip-tiny", input_norm="clamp", feature="penultimate", dim=64),
        TINY_SIGLIP,
    )
    img = _images(64)
    expected = teacher.tower(pixel_values=img, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(teacher(img), expected)


def test_encoder_initialised_from_teacher():
    torch.manual_seed(0)
    teacher = Teacher(TINY_CLIP_TEACHER, TINY_CLIP)
    enc = SemanticEncoder(TINY_CLIP, 64)
    copied = load_teacher_state_into_encoder(enc, teacher)
    assert set(copied) == set(enc.tower.state_dict()) and "proj" not in copied
    for key, value in enc.tower.state_dict().items():
        torch.testing.assert_close(value, teacher.tower.state_dict()[key])
    assert all(p.requires_grad for p in enc.parameters())  # the copy leaves the encoder trainable
    img = _images(64)
    torch.testing.assert_close(enc.tokens(img, -1) @ teacher.tower.proj, teacher(img))


# ---------------------------------------------------------------------------------- weights


def test_missing_pretrained_file_names_path_and_override(tmp_path):
    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(MissingWeightsError, match=str(missing)) as err:
        SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "pretrained": str(missing)}), 64)
    assert "--set model.semantic_encoder.pretrained=" in str(err.value)
    with pytest.raises(MissingWeightsError, match="model.teacher.pretrained"):
        Teacher(TeacherConfig(**{**TINY_CLIP_TEACHER.__dict__, "pretrained": str(missing)}), TINY_CLIP)
    with pytest.raises(MissingWeightsError, match="no-such-folder"):
        SemanticEncoder(
            SemanticEncoderConfig(**{**TINY_SIGLIP.__dict__, "pretrained": str(tmp_path / "no-such-folder")}), 64
        )
    with pytest.raises(MissingWeightsError, match="not-a-tag"):
        SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "pretrained": "not-a-tag"}), 64)


def test_uncached_open_clip_tag_is_reported_not_downloaded(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = SemanticEncoderConfig(model_name="ViT-B-16", pretrained="openai")
    with pytest.raises(MissingWeightsError, match="vit_base_patch16_clip_224.openai"):
        SemanticEncoder(cfg, 224)


def test_local_open_clip_checkpoint_loads(tmp_path):
    import open_clip

    register_tiny_open_clip()
    torch.manual_seed(1)
    clip = open_clip.create_model("tokenflow-tiny-vit")
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    enc = SemanticEncoder(SemanticEncoderConfig(**{**TINY_CLIP.__dict__, "pretrained": str(tmp_path / "tiny.pt")}), 64)
    assert not enc.random_init
    torch.testing.assert_close(enc.tower.conv1.weight, clip.visual.conv1.weight)
    assert "proj" not in enc.tower.state_dict()


def test_local_siglip_folder_loads(tmp_path):
    source = SemanticEncoder(TINY_SIGLIP, 64)
    source.tower.save_pretrained(tmp_path / "siglip")
    enc = SemanticEncoder(SemanticEncoderConfig(**{**TINY_SIGLIP.__dict__, "pretrained": str(tmp_path / "siglip")}), 64)
    assert not enc.random_init
    img = _images(64)
    torch.testing.assert_close(enc(img), source(img))


# ---------------------------------------------------------------------------------- official layouts


def test_clipb_semantic_encoder_matches_official_layout():
    official = _official_rows("tokenflow_clipb224_keys.tsv", "encoder_vqkd.")
    with torch.device("meta"):
        enc = SemanticEncoder(SemanticEncoderConfig(model_name="ViT-B-16", native_size=224), 224)
    # Same names and shapes; only the order inside a block differs (open_clip registers ln_1
    # before attn), which a strict load_state_dict ignores.
    assert dict(_layout(enc.tower)) == dict(official) and len(official) == 5 + 12 * 12 + 2
    assert sum(p.numel() for p in enc.tower.parameters()) == 85_799_424


def test_siglip_semantic_encoder_matches_official_layout():
    official = _official_rows("tokenflow_siglip384_keys.tsv", "encoder_vqkd.vision_model.")
    cfg = SemanticEncoderConfig(
        backend="hf_siglip", model_name="siglip-so400m-patch14-384", native_size=384, feature_layer=-2
    )
    with torch.device("meta"):
        enc = SemanticEncoder(cfg, 384)
    assert dict(_layout(enc.tower)) == dict(official)  # transformers 5 orders layer members differently
    assert enc.grid_size(384) == 27


@pytest.mark.parametrize(
    ("tsv", "width", "grid"),
    [("tokenflow_clipb224_keys.tsv", 768, 14), ("tokenflow_siglip384_keys.tsv", 1152, 27)],
    ids=["clipb", "siglip"],
)
def test_semantic_decoder_matches_official_layout(tsv, width, grid):
    official = _official_rows(tsv, "decoder_vqkd.")
    with torch.device("meta"):
        dec = SemanticDecoder(SemanticDecoderConfig(width=width, depth=3, heads=12, grid_size=grid), 32)
    assert _layout(dec) == official


# ---------------------------------------------------------------------------------- decoder


def test_semantic_decoder_shapes_and_position_resize():
    torch.manual_seed(0)
    dec = SemanticDecoder(SemanticDecoderConfig(width=32, depth=1, heads=2, grid_size=16), 8)
    assert dec(torch.randn(2, 8, 16, 16)).shape == (2, 256, 32)
    assert dec(torch.randn(2, 8, 20, 20)).shape == (2, 400, 32)
    head = task_layer(32, 32, 64)
    assert [type(m).__name__ for m in head] == ["Linear", "Tanh", "Linear"]
    assert head(dec(torch.randn(1, 8, 16, 16))).shape == (1, 256, 64)


def test_beit_attention_bias_layout():
    torch.manual_seed(0)
    attn = BeitAttention(8, 2)
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(1, 5, 8)
    q, k, v = (x @ w.T for w in attn.qkv.weight.chunk(3))
    q, v = q + attn.q_bias, v + attn.v_bias  # key bias is zero
    heads = [
        torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1) @ v[..., s]
        for s in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, dim=-1)))


@pytest.mark.slow
def test_real_vit_b16_tower_layout_and_256px_grid():
    torch.manual_seed(0)
    enc = SemanticEncoder(SemanticEncoderConfig(model_name="ViT-B-16", native_size=224), 256)
    official = _official_rows("tokenflow_clipb224_keys.tsv", "encoder_vqkd.")
    assert dict(_layout(enc.tower)) == dict(official)
    with torch.no_grad():
        assert enc(_images(256, batch=1)).shape == (1, 768, 16, 16)  # 14x14 table resized to 16x16
