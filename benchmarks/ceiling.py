"""This machine's matmul and convolution ceiling, and peak-memory helpers, for benchmarks/inference.py.

The ceiling is the best GFLOP/s of a square GEMM and of a 3x3 convolution shaped like the
decoder's widest layers, per dtype and layout; an achieved figure is then stated as a share of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up (oneDNN primitive creation, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def measure_ceiling(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), size: int = 2048) -> dict:
    """GFLOP/s of `a @ b` (size^3) and of a 256 -> 256 3x3 conv at 2 x 128 x 128 (NCHW and NHWC)."""
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
        out[f"gemm_{name}"] = 2 * size**3 / best_seconds(lambda a=a, b=b: a @ b) / 1e9
        x = torch.randn(2, 256, 128, 128, generator=g).to(dtype)
        w = (torch.randn(256, 256, 3, 3, generator=g) / 48).to(dtype)
        flop = 2 * 9 * 256 * 256 * 128 * 128 * 2
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            xx, ww = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            seconds = best_seconds(lambda xx=xx, ww=ww: F.conv2d(xx, ww, padding=1))
            out[f"conv3x3_{name}_{layout}"] = flop / seconds / 1e9
        out[f"ceiling_{name}"] = max(v for k, v in out.items() if name in k)
    return out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset the process's peak RSS to its current RSS (Linux); returns that RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def peak_since(base: int) -> int:
    """Peak RSS above `base` since the last `reset_peak` (activations and workspace)."""
    return max(0, _status_bytes("VmHWM") - base)
