"""Single-scale vs multi-scale TokenFlow at toy scale (issue 24): reconstruction, codebook usage,
bytes per image and (from the claims report) understanding, for two trained tokenizers.

Both tokenizers go through the same CLI commands a user runs, on each held-out domain:

    tokenflow eval rfid --model M --data DOMAIN --res RES --no-lpips -o OUT/NAME-DOMAIN

(rFID by the official `tokenflow` protocol, PSNR/SSIM by the official calls, and codebook usage
over the held-out images). Understanding is read from the claims report's JSON
(`benchmarks/claims.py --only understanding`: rows `tokenflow` and `single-scale`, the same
llava-toy training on each tokenizer's final map) when `--claims` names it.

    python benchmarks/single_vs_multi.py --single runs/tok-single --data DATA -o OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from pathlib import Path

from claims import portable
from llava_ablation import run

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {"shapes": "shapes-test/images", "natural": "natural-val/images"}


def evaluate(name: str, model: Path, a: argparse.Namespace, env: dict[str, str], places: dict[str, str]) -> dict:
    rows = {}
    for domain, sub in DOMAINS.items():
        out = a.output / f"{name}-{domain}"
        args = ["eval", "rfid", "--model", str(model), "--data", str(a.data / sub), "--res", str(a.res),
                "--no-lpips", "-o", str(out), "--device", a.device]
        if not (out / "report.json").is_file():
            run(args, env, a.output / "log.txt")
        report = json.loads((out / "report.json").read_text())
        result = next(iter(report["results"].values()))
        shared = report["usage"]["shared_semantic_pixel"]["shared"]
        rows[domain] = {"images": result["n"], "rfid": result["rfid"]["tokenflow"], "psnr": result["psnr_official"],
                        "ssim": result["ssim_official"], "usage": shared["overall"]["usage"],
                        "final_scale_usage": shared["per_scale"][-1]["usage"],
                        "perplexity": shared["overall"]["perplexity"],
                        "command": portable("tokenflow " + shlex.join(args), places)}
    model_info = json.loads((a.output / f"{name}-shapes" / "report.json").read_text())["model"]
    info = json.loads(portable(json.dumps(model_info), places))
    return {"model": portable(str(model), places), "tokenizer": info, "domains": rows}


def budget(model_info: dict) -> tuple[int, float]:
    """(tokens per image, bytes per image) of the fixed-length index code."""
    scales, k = model_info.get("scales"), model_info.get("codebook_size")
    tokens = sum(s * s for s in scales)
    return tokens, tokens * math.log2(k) / 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single", type=Path, required=True, help="single-scale tokenizer (run folder or file)")
    p.add_argument("--multi", type=Path, default=REPO / "tokenflow_cli/assets/toy-tokenizer.safetensors")
    p.add_argument("--data", type=Path, required=True, help="folder with shapes-test/ and natural-val/")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/single_vs_multi"))
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--claims", type=Path, default=REPO / "benchmarks/results/claims.json")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results/single_vs_multi.json")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    a.data, a.output = a.data.resolve(), a.output.resolve()
    a.output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    places = {str(a.data): "DATA", str(a.output): "OUT", str(a.single.resolve()): "SINGLE", f"{REPO}/": ""}
    results = {name: evaluate(name, model.resolve(), a, env, places)
               for name, model in (("multi", a.multi), ("single", a.single))}
    vqa = {}
    if a.claims.is_file():
        accuracy = json.loads(a.claims.read_text()).get("sections", {}).get("understanding", {}).get("accuracy", {})
        vqa = {"multi": accuracy.get("tokenflow"), "single": accuracy.get("single-scale")}
    print("| tokenizer | scales | tokens | bytes | domain | PSNR dB | SSIM | rFID | usage % | final-scale usage % "
          "| VQA all % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        scales = r["tokenizer"].get("scales")
        tokens, nbytes = budget(r["tokenizer"])
        r.update(tokens=tokens, bytes=nbytes, vqa=vqa.get(name))
        for domain, d in r["domains"].items():
            acc = f"{100 * vqa[name]['all']:.1f}" if vqa.get(name) else "-"
            cells = [name, ",".join(map(str, scales)), tokens, f"{nbytes:.0f}", domain, f"{d['psnr']:.2f}",
                     f"{d['ssim']:.3f}", f"{d['rfid']:.1f}", f"{100 * d['usage']:.1f}",
                     f"{100 * d['final_scale_usage']:.1f}", acc]
            print("| " + " | ".join(map(str, cells)) + " |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
