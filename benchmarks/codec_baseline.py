"""The TokenFlow tokenizer against WebP and JPEG at the same bytes per image, on held-out crops.

    tokenflow data natural -n 200 --size 32 --split val --seed 1 -o /tmp/natural_val
    python benchmarks/codec_baseline.py --data /tmp/natural_val/images -o /tmp/codec_baseline

The tokenizer runs through the CLI as a user would run it: `tokenflow tokenize DATA -o
OUT/codes.npz`, then `tokenflow reconstruct OUT/codes.npz -o OUT/tokenflow`. Its size is the
fixed-length code of its indices, L * log2(K) / 8 bytes per image (L = sum of the scale sides
squared, K = codebook size, both read from the codes file; no entropy coding, no header).
Every image is then encoded with WebP (method 6) and JPEG at the highest integer quality in
0..100 whose whole file (headers included) fits in that budget, found by binary search; where
even quality 0 does not fit, quality 0 is kept and its real size counted (JPEG cannot go very
low). All three are measured against the same originals, the tokenizer's input (short side
resized to its resolution, centre crop) at that resolution: mean bytes per image, mean PSNR,
rFID and KID (torch-fidelity, through tokenflow_cli.eval.fid; KID subsets of min(1000, n)).
Prints a Markdown table and writes JSON to benchmarks/results/codec_baseline.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CODEC_OPTIONS = {  # Pillow save options; quality is searched per image
    "webp": {"format": "WEBP", "method": 6},  # method 6: slowest, smallest files
    "jpeg": {"format": "JPEG", "optimize": True},  # optimized Huffman tables: JPEG's smallest files
}
QUALITY_RANGE = (0, 100)


@dataclass(frozen=True)
class Encoded:
    """One image's file from a codec at the quality the budget allowed."""

    quality: int
    data: bytes
    fits: bool  # False when even the lowest quality is over the budget


def search_quality(encode: Callable[[int], bytes], budget_bytes: float,
                   qualities: tuple[int, int] = QUALITY_RANGE) -> Encoded:
    """The highest quality q whose `encode(q)` is at most `budget_bytes` long, by binary search
    (file size is taken to grow with quality); the lowest quality when nothing fits."""

    low, high = qualities
    data = encode(low)
    if len(data) > budget_bytes:
        return Encoded(low, data, False)
    best = Encoded(low, data, True)
    while low < high:  # invariant: `best` is quality `low`, which fits; the answer is in [low, high]
        mid = (low + high + 1) // 2
        data = encode(mid)
        if len(data) <= budget_bytes:
            low, best = mid, Encoded(mid, data, True)
        else:
            high = mid - 1
    return best


def encode_image(image_HW3: np.ndarray, codec: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_HW3).save(buffer, quality=quality, **CODEC_OPTIONS[codec])
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def bytes_per_image(scales: tuple[int, ...], codebook_size: int) -> dict:
    """The fixed-length size of one image's indices: L * log2(K) / 8 bytes."""

    tokens = sum(s * s for s in scales)
    bits = tokens * math.log2(codebook_size)
    return {"scales": list(scales), "tokens_per_image": tokens, "codebook_size": codebook_size,
            "bits_per_token": math.log2(codebook_size), "bytes_per_image": bits / 8}


def run_cli(args: list[str]) -> None:
    command = [sys.executable, "-m", "tokenflow_cli", *args]
    print("$ tokenflow " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, env=env)
    if result.returncode:
        sys.exit(f"`tokenflow {args[0]}` failed (exit {result.returncode})")


def run_tokenizer(inputs: Path, out: Path, model: str | None, batch_size: int, device: str) -> Path:
    """tokenize then reconstruct through the CLI; returns the codes file. The grid that
    reconstruct writes beside its PNGs is moved out: torch-fidelity reads every PNG of a folder."""

    codes = out / "codes.npz"
    common = [*(["--model", model] if model else []), "--batch-size", str(batch_size), "--device", device]
    run_cli(["tokenize", str(inputs), "-o", str(codes), *common])
    run_cli(["reconstruct", str(codes), "-o", str(out / "tokenflow"), *common])
    grid = out / "tokenflow" / "grid.png"
    if grid.is_file():
        grid.replace(out / "tokenflow_grid.png")
    return codes


def write_originals(paths: list[str], names: list[str], res: int, folder: Path) -> tuple[np.ndarray, int]:
    """The tokenizer's inputs as PNGs: (N, res, res, 3) uint8, and how many sources were upsampled."""

    from tokenflow_cli.data.images import load_image, resize_center_crop
    from tokenflow_cli.eval.visual import save_png

    originals, upsampled = [], 0
    for path, name in zip(paths, names):
        img = load_image(path)
        upsampled += min(img.size) < res
        originals.append(np.asarray(resize_center_crop(img, res)))
        save_png(originals[-1], folder / name)
    return np.stack(originals), upsampled


def compress(originals_NHW3: np.ndarray, names: list[str], codec: str, budget_bytes: float,
             folder: Path) -> tuple[np.ndarray, list[Encoded]]:
    """Each original at its best quality within the budget, decoded and saved as PNG."""

    from tokenflow_cli.eval.visual import save_png

    decoded, files = [], []
    for image, name in zip(originals_NHW3, names):
        files.append(search_quality(lambda q, image=image: encode_image(image, codec, q), budget_bytes))
        decoded.append(decode_image(files[-1].data))
        save_png(decoded[-1], folder / name)
    return np.stack(decoded), files


def load_pngs(folder: Path, names: list[str]) -> np.ndarray:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        sys.exit(f"{folder} lacks {len(missing)} expected reconstructions, e.g. {missing[:3]}")
    return np.stack([decode_image((folder / n).read_bytes()) for n in names])


def measure(originals: np.ndarray, decoded: np.ndarray, sizes: list[int], features, orig_dir: Path,
            rec_dir: Path) -> dict:
    from tokenflow_cli.eval.fid import fid_kid
    from tokenflow_cli.eval.image_metrics import psnr

    dist = fid_kid(features.features(orig_dir), features.features(rec_dir))
    return {"n": len(sizes), "bytes_mean": float(np.mean(sizes)), "bytes_max": max(sizes),
            "psnr": float(psnr(originals, decoded).mean()), "rfid": dist["fid"], "kid": dist["kid"],
            "kid_std": dist["kid_std"], "kid_subset_size": dist["kid_subset_size"], "folder": str(rec_dir)}


def codec_summary(files: list[Encoded]) -> dict:
    qualities = [f.quality for f in files]
    return {"quality_mean": float(np.mean(qualities)), "quality_min": min(qualities), "quality_max": max(qualities),
            "over_budget": sum(not f.fits for f in files)}


def markdown_table(results: dict, is_real_fid: bool) -> str:
    fid, kid = ("rFID", "KID x1e3") if is_real_fid else ("tiny-FD (NOT FID)", "tiny-KD x1e3 (NOT KID)")
    lines = [f"| codec | quality | bytes/img | PSNR (dB) | {fid} | {kid} |", "|---|---:|---:|---:|---:|---:|"]
    for codec, row in results.items():
        quality = f"{row['quality_mean']:.1f} ({row['quality_min']}-{row['quality_max']})" if "quality_mean" in row \
            else "-"
        over = f" ({row['over_budget']} over budget)" if row.get("over_budget") else ""
        lines.append(f"| {codec} | {quality} | {row['bytes_mean']:.2f}{over} | {row['psnr']:.2f} | {row['rfid']:.2f} "
                     f"| {1e3 * row['kid']:.2f} ± {1e3 * row['kid_std']:.2f} |")
    return "\n".join(lines)


def feature_spec(tiny: bool, inception_weights: str | None):
    from tokenflow_cli.eval.fid import inception_spec, tiny_spec
    from tokenflow_cli.weights import MissingWeightsError

    if tiny:
        return tiny_spec()
    try:
        return inception_spec(inception_weights)
    except MissingWeightsError as err:
        sys.exit(f"{err}; or pass --tiny-features for a smoke test (NOT FID)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder (or glob, list file) of held-out images")
    parser.add_argument("--model", default=None, help="tokenizer run folder or .safetensors (default: the built-in)")
    parser.add_argument("-o", "--output", type=Path, default=Path("codec_baseline"), help="folder for all outputs")
    parser.add_argument("--limit", type=int, default=0, help="first N images in sorted order (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file")
    parser.add_argument("--tiny-features", action="store_true",
                        help="smoke test without Inception weights: tiny extractor, reported NOT FID")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "codec_baseline.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from tokenflow_cli.data.images import list_images
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.eval.fid import FeatureCache
    from tokenflow_cli.fileio import atomic_write_text
    from tokenflow_cli.tokenizer.codes import read_codes
    from tokenflow_cli.tokenizer.reconstruct import output_names

    spec = feature_spec(args.tiny_features, args.inception_weights)
    paths = list_images(args.data)
    paths = paths[: args.limit] if args.limit else paths
    if len(paths) < 2:
        sys.exit("FID and KID need at least 2 images")
    out = args.output
    folders = {name: out / name for name in ("originals", "tokenflow", "webp", "jpeg")}
    for folder in folders.values():  # torch-fidelity reads whole folders: no stale PNGs
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    inputs = out / "inputs.txt"
    inputs.write_text("".join(f"{p.resolve()}\n" for p in paths))

    codes = read_codes(run_tokenizer(inputs, out, args.model, args.batch_size, args.device))
    budget = bytes_per_image(codes.scales, int(codes.meta["codebook_size"]))
    res = int(codes.meta["resolution"])
    kept = [str(p) for p in codes.paths]  # tokenize skips unreadable images
    names = output_names(kept)
    if codes.meta.get("random_init"):
        print("WARNING: the tokenizer is RANDOMLY INITIALISED: its numbers are meaningless")
    originals, upsampled = write_originals(kept, names, res, folders["originals"])
    print(f"{len(kept)} images at {res}px; tokenizer budget {budget['bytes_per_image']:.2f} bytes per image "
          f"({budget['tokens_per_image']} tokens x {budget['bits_per_token']:g} bits)", flush=True)

    features = FeatureCache(spec, cuda=resolve_device(args.device).type == "cuda", batch_size=args.batch_size)
    results = {"tokenflow": measure(originals, load_pngs(folders["tokenflow"], names),
                                    [budget["bytes_per_image"]] * len(kept), features, folders["originals"],
                                    folders["tokenflow"])}
    for codec in CODEC_OPTIONS:
        decoded, files = compress(originals, names, codec, budget["bytes_per_image"], folders[codec])
        row = measure(originals, decoded, [len(f.data) for f in files], features, folders["originals"], folders[codec])
        results[codec] = {**row, **codec_summary(files)}

    table = markdown_table(results, spec.is_real_fid)
    print(table)
    report = {
        "command": "python benchmarks/codec_baseline.py " + " ".join(sys.argv[1:]),
        "data": str(args.data), "images": len(kept), "skipped": len(paths) - len(kept),
        "resolution": res, "sources_upsampled": upsampled,
        "tokenizer": {**budget, "name": codes.meta.get("tokenizer"), "source": codes.meta.get("tokenizer_source"),
                      "sha256": codes.meta.get("tokenizer_sha256"), "random_init": codes.meta.get("random_init")},
        "protocol": {
            "originals": f"short side resized to {res}, centre crop (the tokenizer's input), saved as PNG",
            "tokenizer_bytes": "L * log2(K) / 8: fixed-length indices, no entropy coding, no header",
            "codec_bytes": "whole encoded file, headers included",
            "quality_search": "highest integer quality in 0..100 within the budget (binary search); "
                              "quality 0 and its real size where nothing fits",
            "codec_options": {c: {k: v for k, v in o.items() if k != "format"} for c, o in CODEC_OPTIONS.items()},
            "pillow": Image.__version__,
            "features": spec.label, "is_real_fid": spec.is_real_fid, "weights_sha256": spec.weights_sha256,
        },
        "results": results,
        "table": table,
    }
    atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
