"""Tokenizer on CUDA: fp32 (TF32 off) gives the CPU's indices; every faster mode states its index
agreement with fp32 and its reconstruction difference (recorded with record_property and printed;
asserted only within sane bounds); `tokenize --compile --device cuda` works."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from gpu_helpers import no_tf32

from tokenflow_cli.tokenizer.inference import InferenceOptions, inference_context, prepare_for_inference

pytestmark = pytest.mark.gpu


def _images(size: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1  # smooth, photo-like
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(-1, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / max(float((a.float() - b.float()).pow(2).mean()), 1e-20))


def test_fp32_on_cuda_gives_the_cpu_indices(tiny_tokenizer, device, record_property):
    img = _images(tiny_tokenizer.image_size)
    with torch.no_grad():
        cpu_idx = tiny_tokenizer.img_to_codes(img).indices
        cpu_rec = tiny_tokenizer.codes_to_img(cpu_idx)
    tok = copy.deepcopy(tiny_tokenizer).to(device)
    with torch.no_grad(), no_tf32():
        idx = tok.img_to_codes(img.to(device)).indices.cpu()
        rec = tok.codes_to_img(cpu_idx.to(device)).cpu()
    agreement = float((idx == cpu_idx).float().mean())
    record_property("cuda_fp32_index_agreement", agreement)
    record_property("cuda_fp32_decode_psnr_db", _psnr(rec, cpu_rec))
    print(f"fp32 CUDA vs CPU: {100 * agreement:.3f}% indices, decode {_psnr(rec, cpu_rec):.1f} dB")
    # the same math in another summation order: a flip needs a near-tie (1e-6) in a random model
    assert agreement >= 0.999
    assert torch.equal(idx[:, :5], cpu_idx[:, :5])  # the coarsest scales: no ties that close
    torch.testing.assert_close(rec, cpu_rec, atol=1e-3, rtol=0)


MODES = {  # mode -> (options, allow TF32, least index agreement, least decode PSNR in dB): sanity, not targets
    "bf16": (InferenceOptions(dtype="bf16"), False, 0.2, 25.0),
    "tf32": (InferenceOptions(), True, 0.5, 35.0),
    "channels-last": (InferenceOptions(), False, 0.999, 60.0),
    "nchw": (InferenceOptions(channels_last=False), False, 0.999, 60.0),
    "bf16-compile": (InferenceOptions(dtype="bf16", compile=True), False, 0.2, 25.0),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_faster_mode_states_agreement_and_reconstruction(tiny_tokenizer, device, mode, record_property):
    options, allow_tf32, least_agreement, least_psnr = MODES[mode]
    if options.compile and device.type != "cuda":
        pytest.skip("compile is checked on CUDA (minutes on a small CPU)")
    img = _images(tiny_tokenizer.image_size).to(device)
    ref = copy.deepcopy(tiny_tokenizer).to(device)
    with torch.no_grad(), no_tf32():
        ref_idx = ref.img_to_codes(img).indices
        ref_rec = ref.codes_to_img(ref_idx)
    fast = prepare_for_inference(copy.deepcopy(tiny_tokenizer).to(device), options)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        with inference_context():
            idx = fast.img_to_codes(img).indices
            rec = fast.codes_to_img(ref_idx)  # the same indices in: the decoder's own difference
            rec_own = fast.codes_to_img(idx)  # what a user gets from this mode end to end
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    agreement = float((idx == ref_idx).float().mean())
    figures = {"index_agreement": agreement, "decode_psnr_db": _psnr(rec, ref_rec),
               "end_to_end_psnr_vs_fp32_db": _psnr(rec_own, ref_rec), "recon_psnr_vs_input_db": _psnr(rec_own, img),
               "fp32_recon_psnr_vs_input_db": _psnr(ref_rec, img)}
    for key, value in figures.items():
        record_property(f"{mode}_{key}", round(value, 4))
    print(f"{mode}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    assert int(idx.min()) >= 0 and int(idx.max()) < fast.codebook_size and rec.dtype == torch.float32
    assert torch.isfinite(rec).all()
    assert agreement >= least_agreement and figures["decode_psnr_db"] >= least_psnr


def test_tokenize_compile_on_cuda(tmp_path, device):
    if device.type != "cuda":
        pytest.skip("compile is checked on CUDA (minutes on a small CPU)")
    from PIL import Image

    from tokenflow_cli.tokenizer.codes import read_codes
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths

    paths = []
    for i, img in enumerate(((_images(80, n=6) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(img.numpy()).save(paths[-1])
    tok = resolve_tokenizer("tiny", device)
    plain = tokenize_paths(tok, paths, tmp_path / "plain.npz", batch_size=4, workers=2)
    tok = prepare_for_inference(tok, InferenceOptions(compile=True))
    with inference_context():
        compiled = tokenize_paths(tok, paths, tmp_path / "compiled.npz", batch_size=4, workers=2)
    assert plain.n_images == compiled.n_images == 6
    a, b = read_codes(tmp_path / "plain.npz").indices, read_codes(tmp_path / "compiled.npz").indices
    assert float(np.mean(np.asarray(a) == np.asarray(b))) >= 0.95  # fused kernels round differently
