"""`tokenflow convert` on full-size fabricated official checkpoints, and tokenize throughput.

For each official variant: writes a file with exactly the listed keys and shapes (random values,
from tests/data/*_keys.tsv, listed from the official checkpoints) in the official layout,
converts it in a fresh process and reports wall time and that process's peak resident memory
(VmHWM; includes the memory-mapped source pages it touched and the ~0.5 GB of imported libraries, reported separately as
`baseline`). Then tokenizes random 256 px images with the converted clipb-256-enhanced model on
CPU. Files go to a temporary folder that is deleted afterwards.

    python benchmarks/convert.py [--variants clipb-224,clipb-256-enhanced,siglip-384]
                                 [--images 32] [--batch-size 8] [--tmp /tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFFICIAL = Path(__file__).resolve().parents[1] / "tests" / "data"
TSV = {
    "clipb-224": "tokenflow_clipb224_keys.tsv",
    "clipb-256-enhanced": "tokenflow_clipb224_enhanced_keys.tsv",
    "siglip-384": "tokenflow_siglip384_keys.tsv",
}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def fabricate(variant: str, path: Path) -> None:
    import argparse as ap

    import torch

    with open(OFFICIAL / TSV[variant]) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for row in rows:
        shape = tuple(int(x) for x in row["shape"].split("x"))
        if row["key"].startswith("scaling_layer."):
            sd[row["key"]] = torch.full(shape, 0.5)
        else:
            sd[row["key"]] = torch.randn(shape, generator=g) * 0.02
    torch.save({"model": sd, "args": ap.Namespace(teacher=variant), "steps": 1}, path)


def convert_child(src: Path, dst: Path) -> None:
    from tokenflow_cli.tokenizer.convert import convert_checkpoint

    baseline = _vm("VmRSS")
    start = time.perf_counter()
    report = convert_checkpoint(src, dst)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": _vm("VmHWM"), "baseline": baseline, "variant": report.variant}))


def throughput(path: Path, n_images: int, batch_size: int) -> dict:
    import torch

    from tokenflow_cli.tokenizer.model import load_tokenizer

    tok = load_tokenizer(path)
    size = tok.image_size
    imgs = torch.rand(n_images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        tok.img_to_codes(imgs[:batch_size])  # warm-up
        start = time.perf_counter()
        for i in range(0, n_images, batch_size):
            tok.img_to_codes(imgs[i : i + batch_size])
        seconds = time.perf_counter() - start
    return {"images": n_images, "size": size, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "seconds": seconds, "images_per_s": n_images / seconds}  # fmt: skip


def _run(args: list[str]) -> str:
    return subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(TSV))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_fabricate", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_convert", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._fabricate:
        return fabricate(args._fabricate[0], Path(args._fabricate[1]))
    if args._convert:
        return convert_child(Path(args._convert[0]), Path(args._convert[1]))

    results: dict = {"convert": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for variant in args.variants.split(","):
            src, dst = Path(tmp) / f"{variant}.pt", Path(tmp) / f"{variant}.safetensors"
            _run(["--_fabricate", variant, str(src)])
            row = json.loads(_run(["--_convert", str(src), str(dst)]).strip().splitlines()[-1])
            row.update(source_bytes=src.stat().st_size, output_bytes=dst.stat().st_size)
            results["convert"][variant] = row
            print(
                f"{variant:20s} {row['source_bytes'] / 2**30:5.2f} GiB -> {row['output_bytes'] / 2**30:5.2f} GiB "
                f"in {row['seconds']:6.1f} s, peak RSS {row['peak_rss'] / 2**30:5.2f} GiB "
                f"(baseline {row['baseline'] / 2**30:4.2f} GiB)",
                flush=True,
            )
            src.unlink()
            if variant == "clipb-256-enhanced":
                results["tokenize"] = throughput(dst, args.images, args.batch_size)
                t = results["tokenize"]
                print(
                    f"tokenize {t['images']} x {t['size']} px, batch {t['batch_size']}, {t['threads']} threads: "
                    f"{t['images_per_s']:.2f} images/s",
                    flush=True,
                )
            dst.unlink()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
