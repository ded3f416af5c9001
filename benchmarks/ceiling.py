"""The machine's matmul and convolution ceiling, timing and peak-memory helpers for the benchmarks
(inference.py, sampler.py, train_throughput.py, tokenize_throughput.py), on CPU or CUDA.

The ceiling is the best GFLOP/s of a square GEMM and of a 3x3 convolution shaped like the
decoder's widest layers, per dtype and layout (on CUDA also fp32 with TF32 allowed); an achieved
figure is then stated as a share of it, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenflow_cli.tokenizer.inference import matmul_precision


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for the device's queued work (a no-op on CPU), so a wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], repeats: int = 3, device: torch.device | str = "cpu") -> float:
    fn()  # warm-up (oneDNN primitive creation / cuBLAS heuristics, page faults)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


tf32 = matmul_precision  # TF32 allowed or not inside a block (restored after); fp32 figures run with it off


@torch.inference_mode()
def measure_ceiling(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), size: int = 0,
                    device: torch.device | str = "cpu") -> dict:
    """GFLOP/s of `a @ b` (size^3; 2048 on CPU, 8192 on CUDA) and of a 256 -> 256 3x3 conv at
    N x 128 x 128 (N 2 on CPU, 32 on CUDA; NCHW and NHWC; 128 is size / 16 for a smaller size).
    On CUDA fp32 is measured with TF32 off (`ceiling_float32`) and on (`ceiling_tf32`)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 2048)
    batch, hw = (32 if cuda else 2), min(128, size // 16)
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    variants = [(dtype, False) for dtype in dtypes] + ([(torch.float32, True)] if cuda else [])
    for dtype, allow_tf32 in variants:
        name = "tf32" if allow_tf32 else str(dtype).removeprefix("torch.")
        with tf32(allow_tf32):
            a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
            out[f"gemm_{name}"] = 2 * size**3 / best_seconds(lambda a=a, b=b: a @ b, device=device) / 1e9
            x = torch.randn(batch, 256, hw, hw, generator=g).to(device, dtype)
            w = (torch.randn(256, 256, 3, 3, generator=g) / 48).to(device, dtype)
            flop = 2 * 9 * 256 * 256 * hw * hw * batch
            for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
                xx, ww = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
                seconds = best_seconds(lambda xx=xx, ww=ww: F.conv2d(xx, ww, padding=1), device=device)
                out[f"conv3x3_{name}_{layout}"] = flop / seconds / 1e9
        out[f"ceiling_{name}"] = max(v for k, v in out.items() if k.split("_")[1] == name)
    return out


def ceiling_of(ceiling: dict, dtype: str) -> float:
    """The ceiling (GFLOP/s) a mode's figure is a share of: "bf16"/"bfloat16" -> bf16, "tf32" ->
    TF32 (fp32 where there is none: CPU), anything else fp32."""
    if dtype in ("bf16", "bfloat16"):
        return ceiling["ceiling_bfloat16"]
    return ceiling.get("ceiling_tf32", ceiling["ceiling_float32"]) if dtype == "tf32" else ceiling["ceiling_float32"]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: torch.device | str = "cpu") -> int:
    """Reset the peak-memory mark: on CUDA the allocator's peak (returns the allocated bytes now);
    on CPU the process's peak RSS to its current RSS (Linux; returns that RSS)."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def peak_since(base: int, device: torch.device | str = "cpu") -> int:
    """Peak memory above `base` since the last `reset_peak` (activations and workspace)."""
    if torch.device(device).type == "cuda":
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    return max(0, _status_bytes("VmHWM") - base)


def peak_total(device: torch.device | str = "cpu") -> int:
    """Peak memory in bytes since the last reset, resident model included (CUDA allocator; CPU RSS)."""
    if torch.device(device).type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")
