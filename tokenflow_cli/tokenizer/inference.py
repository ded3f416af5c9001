"""Fast tokenizer inference: one options object, one preparation step, one context.

    opts = InferenceOptions(dtype="bf16", compile=False)
    tok = prepare_for_inference(TokenFlowTokenizer.from_pretrained(path), opts)
    with inference_context():
        codes = tok.img_to_codes(img_B3HW)     # indices: always searched in fp32
        img = tok.codes_to_img(codes)          # fp32 image, whatever the decoder runs in

What changes and what does not (measured in benchmarks/inference.py, docs/RESULTS.md):

- fp32 (the default) keeps the math: channels-last convolutions (oneDNN's native layout; the
  same products and sums, so the indices stay identical to the official computation and the
  images differ from NCHW by float rounding only), no autograd state (`torch.inference_mode`).
- bf16 / fp16 cast the networks (pixel encoder and decoder, semantic tower, projections and
  semantic decoder) to that dtype; the quantizer and its codebooks stay fp32, so the nearest-code
  search and the code vectors are exact fp32 on whatever features arrive. On a CPU with
  avx512_bf16 decoding at bf16 runs at ~2.6x the official fp32 decode, ~45 dB PSNR from the fp32
  image. Encoding at bf16 changes most indices (one early flip changes every later scale's
  residual; ~29% agree on clipb-256-enhanced), so `tokenize` should stay fp32 when codes matter;
  `scope="decoders"` keeps the encoders fp32 (exact indices) and decodes in bf16.
- tf32 (CUDA only) keeps the networks fp32 but lets matmuls and cuDNN convolutions round their
  inputs to TF32 (about 3x fp32 on an H200; 89-99% of indices agree). Every other mode runs with
  TF32 off inside encode/decode (`matmul_precision`), so fp32 on CUDA is the official fp32
  computation and gives the CPU indices; PyTorch's own default lets cuDNN convolve fp32 in TF32.
- `compile` wraps the pixel encoder and decoder in `torch.compile` (fuses GroupNorm, swish and
  the residual adds); the first batch of each shape compiles (minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tokenflow_cli.device import dtype_of

# Parts cast to the inference dtype; `quantizer` (codebooks, search) is never among them.
ENCODER_PARTS = ("pixel_encoder", "quant_conv", "semantic_encoder", "semantic_proj")
DECODER_PARTS = ("post_quant_conv", "pixel_decoder", "semantic_decoder", "semantic_head")
NETWORK_PARTS = ENCODER_PARTS + DECODER_PARTS
SCOPES = {"all": NETWORK_PARTS, "decoders": DECODER_PARTS}  # which parts take `dtype`
CONV_PARTS = ("pixel_encoder", "quant_conv", "post_quant_conv", "pixel_decoder")  # NHWC when channels_last
COMPILED_PARTS = ("pixel_encoder", "pixel_decoder")


@dataclass(frozen=True)
class InferenceOptions:
    dtype: str = "fp32"  # precision of the networks (device.PRECISIONS); the quantizer always runs in fp32
    compile: bool = False  # torch.compile the pixel encoder and decoder (slow first batch per shape)
    channels_last: bool = True  # NHWC convolutions: same math, oneDNN's fastest layout on CPU
    scope: str = "all"  # parts in `dtype`: "all", or "decoders" (encoders fp32: exact indices, fast decode)
    tf32: bool = False  # CUDA: fp32 matmuls/convolutions in TF32 (faster; not the official fp32 computation)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> InferenceOptions:
        """A `--dtype` value: a precision name (fp32, bf16, fp16), or `tf32` (fp32 networks, TF32 math)."""
        return cls(dtype="fp32", tf32=True, **kwargs) if name == "tf32" else cls(dtype=name, **kwargs)

    def __post_init__(self) -> None:
        dtype_of(self.dtype)  # a ValueError naming the choices
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {sorted(SCOPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_of(self.dtype)

    def describe(self) -> dict:
        """What a report should say about how the numbers were computed."""
        return {"dtype": "tf32" if self.tf32 else self.dtype, "scope": self.scope, "compile": self.compile,
                "channels_last": self.channels_last, "quantizer": "fp32"}  # fmt: skip


def prepare_for_inference(tok: nn.Module, opts: InferenceOptions | None = None) -> nn.Module:
    """Ready `tok` for encode/decode in place (and return it): eval mode, no gradients, the
    networks in `opts.dtype` and NHWC, optionally compiled. Training it afterwards is not
    supported (rebuild or reload instead)."""
    opts = opts or InferenceOptions()
    tok.eval().requires_grad_(False)
    for name in SCOPES[opts.scope]:
        getattr(tok, name).to(opts.torch_dtype)
    if opts.channels_last:
        for name in CONV_PARTS:
            getattr(tok, name).to(memory_format=torch.channels_last)
    if opts.compile:
        for name in COMPILED_PARTS:
            part: nn.Module = getattr(tok, name)
            part.compile(dynamic=False)
    tok.inference_options = opts
    return tok


@contextlib.contextmanager
def inference_context() -> Iterator[None]:
    """Encode/decode without autograd bookkeeping. No autocast: prepared parts already hold
    their dtype and cast their inputs, so nothing is re-cast per call and the quantizer stays fp32."""
    with torch.inference_mode():
        yield


@contextlib.contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions with TF32 allowed or not, restored afterwards (the flags
    are process-wide; PyTorch's default allows TF32 in cuDNN convolutions)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def options_of(tok: nn.Module) -> InferenceOptions:
    """The options `tok` was prepared with (fp32 defaults for an unprepared tokenizer)."""
    return getattr(tok, "inference_options", InferenceOptions())
