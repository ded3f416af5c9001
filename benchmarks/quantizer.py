"""Nearest-code search: chunked (ours) vs the plain full-distance argmin (official style).

For K in {8192, 32768, 131072} and the token counts of the 256 and 384 recipes at batch 8
(817 and 2227 tokens per image, all scales searched at once), reports time, peak extra memory,
achieved GFLOP/s (2*N*K*40 multiply-adds of the distance matmul) and, as the ceiling, the GFLOP/s
of a same-shape `torch.mm`. Ratios are against the plain search in the same run.

    python benchmarks/quantizer.py [--device cpu|cuda] [--json out.json] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenflow_cli.tokenizer.quantizer import nearest_code

D_SEM, D_PIX = 32, 8


def plain_full_distance(z_sem, z_pix, cb_sem, cb_pix, w=1.0):
    """The official way: materialise the full N x K distance of each half, add, argmin."""
    d_sem = z_sem.pow(2).sum(1, keepdim=True) + cb_sem.pow(2).sum(1) - 2 * z_sem @ cb_sem.T
    d_pix = z_pix.pow(2).sum(1, keepdim=True) + cb_pix.pow(2).sum(1) - 2 * z_pix @ cb_pix.T
    return (d_sem + w * d_pix).argmin(1)


def _rss_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # resets VmHWM to the current RSS (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_hwm_bytes()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_hwm_bytes()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn, device: torch.device, repeats: int) -> tuple[float, int, object]:
    out = fn()  # warm-up
    base = _reset_peak(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), max(0, _peak(device) - base), out


def run(device: torch.device, repeats: int, quick: bool, chunk: int) -> list[dict]:
    rows = []
    ks = [8192, 32768] if quick else [8192, 32768, 131072]
    for tokens_per_image, recipe in ((817, "clipb-256"), (2227, "siglip-384")):
        n = 8 * tokens_per_image
        for k in ks:
            g = torch.Generator(device="cpu").manual_seed(0)
            z_sem = F.normalize(torch.randn(n, D_SEM, generator=g), dim=1).to(device)
            z_pix = F.normalize(torch.randn(n, D_PIX, generator=g), dim=1).to(device)
            cb_sem = F.normalize(torch.randn(k, D_SEM, generator=g), dim=1).to(device)
            cb_pix = F.normalize(torch.randn(k, D_PIX, generator=g), dim=1).to(device)
            flop = 2.0 * n * k * (D_SEM + D_PIX)
            args = (z_sem, z_pix, cb_sem, cb_pix)
            plain_need = 3 * n * k * 4  # d_sem, d_pix and their sum, all N x K fp32
            plain_fits = plain_need < 0.7 * available_bytes(device)
            if plain_fits:
                t_plain, m_plain, idx_plain = measure(lambda args=args: plain_full_distance(*args), device, repeats)
            else:  # the official full-matrix search does not fit: report it rather than be OOM-killed
                t_plain, m_plain, idx_plain = float("nan"), plain_need, None
            search = lambda args=args: nearest_code(*args, chunk_size=chunk)  # noqa: E731
            t_chunk, m_chunk, idx_chunk = measure(search, device, repeats)
            a, b = torch.randn(n, D_SEM + D_PIX, device=device), torch.randn(D_SEM + D_PIX, k, device=device)
            t_mm, _, _ = measure(lambda a=a, b=b: a @ b, device, repeats)
            agree = float((idx_plain == idx_chunk).float().mean()) if plain_fits else float("nan")
            rows.append(
                {
                    "recipe": recipe,
                    "tokens": n,
                    "K": k,
                    "chunk": chunk,
                    "plain_fits": plain_fits,
                "plain_s": t_plain,
                    "chunked_s": t_chunk,
                    "speedup": t_plain / t_chunk,
                    "plain_peak_MiB": m_plain / 2**20,
                    "chunked_peak_MiB": m_chunk / 2**20,
                    "memory_ratio": (m_chunk / m_plain) if m_plain and plain_fits else None,
                    "chunked_GFLOPs": flop / t_chunk / 1e9,
                    "plain_GFLOPs": flop / t_plain / 1e9,
                    "mm_GFLOPs": flop / t_mm / 1e9,
                    "index_agreement": agree,
                }
            )
    return rows


def print_table(rows: list[dict], device: torch.device) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        for r in rows:
            print(r)
        return
    table = Table(title=f"nearest-code search on {device} (batch 8, fp32)")
    for col in (
        "recipe",
        "N tokens",
        "K",
        "plain s",
        "chunked s",
        "speed-up",
        "plain MiB",
        "chunked MiB",
        "chunked GFLOP/s",
        "mm GFLOP/s",
        "same idx",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["recipe"],
            str(r["tokens"]),
            str(r["K"]),
            f"{r['plain_s']:.3f}" if r["plain_fits"] else f"OOM ({r['plain_peak_MiB'] / 1024:.0f} GiB)",
            f"{r['chunked_s']:.3f}",
            f"{r['speedup']:.2f}x",
            f"{r['plain_peak_MiB']:.0f}",
            f"{r['chunked_peak_MiB']:.0f}",
            f"{r['chunked_GFLOPs']:.1f}",
            f"{r['mm_GFLOPs']:.1f}",
            f"{100 * r['index_agreement']:.3f}%",
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="skip K=131072")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = run(device, args.repeats, args.quick, args.chunk)
    print_table(rows, device)
    if args.json:
        args.json.write_text(
            json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
