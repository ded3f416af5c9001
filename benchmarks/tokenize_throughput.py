"""`tokenize` end to end: JPEG files on disk -> codes file on disk, beside the network-only rate
(issue 23: decoding and resizing must not starve the GPU).

Writes `--images` smooth random JPEGs at 1.25x the tokenizer's resolution (so the resize and
centre crop run as for real photos), then per dtype: the network-only rate (the same batches
already decoded and on the device, encode only) and `tokenize_paths` (the library behind
`tokenflow tokenize`: a decode thread pool of `--workers`, one batch decoded ahead into pinned
memory, non-blocking copies, the on-disk index buffer and the .npz write). Both after one
warm-up pass over the first batch. Random weights: the speed does not depend on them.

    python benchmarks/tokenize_throughput.py [--layout clipb-256-enhanced|siglip-384|RECIPE] [--device cuda]
        [--images 512] [--batch-size 64] [--workers 8] [--dtypes bf16,fp32] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ceiling import ceiling_of, device_name, measure_ceiling, sync
from inference import build_layout, count_flops
from official_reference import random_images
from PIL import Image

from tokenflow_cli.tokenizer.inference import InferenceOptions, inference_context, prepare_for_inference
from tokenflow_cli.tokenizer.tokenize import tokenize_paths


def write_jpegs(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    side = size * 5 // 4
    paths = []
    for i in range(0, n, 64):
        block = random_images(min(64, n - i), side, seed=i)
        for j, img in enumerate(((block + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)):
            paths.append(folder / f"{i + j:06d}.jpg")
            Image.fromarray(img.numpy()).save(paths[-1], quality=90)
    return paths


def network_only(tok, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds to encode `images` (already decoded, on the device) in batches."""
    with inference_context():
        tok.img_to_codes(images[:batch_size])  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            tok.img_to_codes(images[i : i + batch_size]).indices.cpu()
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="clipb-256-enhanced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--ceiling-size", type=int, default=0, help="GEMM size of the ceiling (0: per device)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/tokenize_throughput.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    ceiling = measure_ceiling(size=args.ceiling_size, device=device)
    _, base = build_layout(args.layout)
    base = base.to(device)
    with torch.no_grad():
        flop = count_flops(lambda x: base.img_to_codes(x).indices, random_images(1, base.image_size).to(device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenize-throughput-") as tmp:
        paths = write_jpegs(Path(tmp) / "jpeg", args.images, base.image_size)
        decoded = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize(
            (base.image_size,) * 2))).permute(2, 0, 1) for p in paths[: args.images]]).float() / 127.5 - 1
        decoded = decoded.to(device)
        for dtype in args.dtypes.split(","):
            tok = prepare_for_inference(copy.deepcopy(base), InferenceOptions(dtype=dtype))
            net_s = network_only(tok, decoded, args.batch_size, device)
            tokenize_paths(tok, paths[: args.batch_size], Path(tmp) / "warm.npz", args.batch_size, args.workers)
            sync(device)
            start = time.perf_counter()
            result = tokenize_paths(tok, paths, Path(tmp) / f"codes-{dtype}.npz", args.batch_size, args.workers)
            sync(device)
            files_s = time.perf_counter() - start
            assert result.n_images == len(paths), result.failures[:3]
            files_rate, net_rate = len(paths) / files_s, len(paths) / net_s
            rows.append({"layout": args.layout, "dtype": dtype, "images": len(paths), "batch_size": args.batch_size,
                         "workers": args.workers, "device": str(device), "gflop_per_image": flop / 1e9,
                         "files_seconds": files_s, "files_images_per_s": files_rate,
                         "network_seconds": net_s, "network_images_per_s": net_rate,
                         "files_share_of_network": files_rate / net_rate, "files_tflops": flop * files_rate / 1e12,
                         "network_tflops": flop * net_rate / 1e12,
                         "share_of_ceiling": flop * net_rate / 1e9 / ceiling_of(ceiling, dtype),
                         "codes_bytes": (Path(tmp) / f"codes-{dtype}.npz").stat().st_size})
            r = rows[-1]
            print(f"{args.layout} {dtype}: files->codes {files_rate:.1f} img/s, network only {net_rate:.1f} img/s "
                  f"({100 * r['files_share_of_network']:.0f}%), {r['network_tflops']:.2f} TFLOP/s network "
                  f"({100 * r['share_of_ceiling']:.1f}% of the {dtype} ceiling)", flush=True)
            del tok
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "device": device_name(device),
                                     "cpus": os.cpu_count(), "machine": platform.machine(),
                                     "ceiling_gflops": ceiling, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
