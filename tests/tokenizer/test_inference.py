"""Inference preparation (tokenizer/inference.py): fp32 stays exact, faster modes are measured.

fp32 must give the same indices as the unprepared model and as the independent reference of the
official computation (convert_reference.py); bf16 agreement and reconstruction difference are
recorded (record_property), not asserted beyond sanity; no test asserts a wall time.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from convert_reference import fabricate, reference_encode
from test_convert import SMALL_CLIP, _small_config, small_towers  # noqa: F401  (fixture)

from tokenflow_cli.tokenizer.convert import convert_state_dict
from tokenflow_cli.tokenizer.inference import (
    NETWORK_PARTS,
    InferenceOptions,
    inference_context,
    options_of,
    prepare_for_inference,
)
from tokenflow_cli.tokenizer.model import build_tokenizer


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def _encode_decode(tok, img):
    idx = tok.img_to_codes(img).indices
    return idx, tok.codes_to_img(idx), tok.codes_to_features(idx)


def test_fp32_prepared_gives_the_unprepared_results(tiny_tokenizer):
    img = _images(tiny_tokenizer.image_size)
    idx, rec, feat = _encode_decode(tiny_tokenizer, img)
    fast = prepare_for_inference(copy.deepcopy(tiny_tokenizer), InferenceOptions())
    with inference_context():
        idx_fast = fast.img_to_codes(img).indices
        rec_fast = fast.codes_to_img(idx)
        feat_fast = fast.codes_to_features(idx)
    assert torch.equal(idx_fast, idx)  # bitwise: same indices
    assert torch.equal(feat_fast, feat)  # the quantizer is untouched
    assert rec_fast.dtype == torch.float32
    torch.testing.assert_close(rec_fast, rec, atol=1e-5, rtol=0)  # channels-last: same math
    assert fast.pixel_decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    assert options_of(fast) == InferenceOptions()


def test_fp32_prepared_reproduces_the_official_reference_indices(small_towers):  # noqa: F811
    official = fabricate(SMALL_CLIP, seed=5)
    cfg = _small_config(SMALL_CLIP)
    tok = build_tokenizer(cfg)
    tok.load_state_dict(convert_state_dict(official, cfg)[0], strict=True)
    tok = prepare_for_inference(tok)
    img = _images(SMALL_CLIP.image_size, seed=2)
    with torch.no_grad():
        ref_idx, margin = reference_encode(official, img, SMALL_CLIP)  # fp32, official ordering
    with inference_context():
        idx = tok.img_to_codes(img).indices
    assert margin > 1e-5, "fixture too close to a tie for a meaningful comparison"
    assert torch.equal(idx, ref_idx)


def test_bf16_casts_the_networks_and_keeps_the_quantizer_fp32(tiny_tokenizer, record_property):
    img = _images(tiny_tokenizer.image_size)
    idx, rec, _ = _encode_decode(tiny_tokenizer, img)
    fast = prepare_for_inference(copy.deepcopy(tiny_tokenizer), InferenceOptions(dtype="bf16"))
    for name in NETWORK_PARTS:
        assert all(p.dtype == torch.bfloat16 for p in getattr(fast, name).parameters()), name
    assert all(p.dtype == torch.float32 for p in fast.quantizer.parameters())
    with inference_context():
        idx_bf16 = fast.img_to_codes(img).indices
        rec_bf16 = fast.codes_to_img(idx)  # same indices in: the decoder's own difference
    assert idx_bf16.shape == idx.shape and int(idx_bf16.min()) >= 0 and int(idx_bf16.max()) < fast.codebook_size
    assert rec_bf16.dtype == torch.float32 and torch.isfinite(rec_bf16).all()
    agreement = float((idx_bf16 == idx).float().mean())
    psnr = 10 * math.log10(4.0 / max(float((rec_bf16 - rec).pow(2).mean()), 1e-20))
    record_property("bf16_index_agreement", agreement)
    record_property("bf16_decode_psnr_db", psnr)
    assert psnr > 20  # sanity (a wrong cast or layout gives noise), not the measured figure


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="bf16"):
        InferenceOptions(dtype="int8")


def test_tf32_is_fp32_networks_with_tf32_math_and_every_other_mode_turns_tf32_off(tiny_tokenizer):
    opts = InferenceOptions.from_name("tf32")
    assert (opts.dtype, opts.tf32, opts.describe()["dtype"]) == ("fp32", True, "tf32")
    assert not InferenceOptions.from_name("bf16").tf32
    seen = []
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # PyTorch's cuDNN default
    try:
        quantizer = tiny_tokenizer.quantizer
        original = quantizer.forward

        def spy(*args, **kwargs):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return original(*args, **kwargs)

        quantizer.forward = spy
        try:
            tiny_tokenizer.img_to_codes(_images(tiny_tokenizer.image_size))
        finally:
            del quantizer.forward
        assert seen == [(False, False)]  # strict fp32 inside encode: the official fp32 computation
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.slow  # torch.compile of two CNNs takes a minute or more on 2 cores
def test_compile_flag_path_gives_the_same_indices(tiny_tokenizer, record_property):
    img = _images(tiny_tokenizer.image_size)
    idx, rec, _ = _encode_decode(tiny_tokenizer, img)
    fast = prepare_for_inference(copy.deepcopy(tiny_tokenizer), InferenceOptions(compile=True))
    with inference_context():
        idx_c = fast.img_to_codes(img).indices
        rec_c = fast.codes_to_img(idx)
    record_property("compile_index_agreement", float((idx_c == idx).float().mean()))
    assert float((idx_c == idx).float().mean()) >= 0.99  # fused kernels may round differently
    torch.testing.assert_close(rec_c, rec, atol=1e-4, rtol=0)


def test_decoders_scope_keeps_encode_exact(tiny_tokenizer):
    img = _images(tiny_tokenizer.image_size)
    idx, _, _ = _encode_decode(tiny_tokenizer, img)
    fast = prepare_for_inference(copy.deepcopy(tiny_tokenizer), InferenceOptions(dtype="bf16", scope="decoders"))
    assert fast.pixel_encoder.conv_in.weight.dtype == torch.float32
    assert fast.pixel_decoder.conv_in.weight.dtype == torch.bfloat16
    with inference_context():
        assert torch.equal(fast.img_to_codes(img).indices, idx)
        assert fast.codes_to_img(idx).dtype == torch.float32
    with pytest.raises(ValueError, match="decoders"):
        InferenceOptions(scope="encoders")
