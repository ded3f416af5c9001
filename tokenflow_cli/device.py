"""Device, precision and seeding in one place."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision name -> dtype


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (fp32, bf16, fp16), or a ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return device


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context: CUDA autocast for bf16/fp16; on CPU, bf16 autocast (matmuls and
    convolutions in bf16, about twice the fp32 rate on CPUs with AVX512-BF16 or AMX) and a no-op
    for fp16 (slow on CPUs, and it would need a gradient scaler); a no-op for fp32."""
    dtype = dtype_of(precision)
    if precision == "fp32" or (device.type != "cuda" and dtype != torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def describe_threads() -> str:
    return f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
