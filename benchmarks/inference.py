"""Tokenizer encode (images -> indices) and decode (indices -> images): ours against the official
computation, full size, random weights, in one run.

For each layout (clipb-256-enhanced, siglip-384) the same random official weights feed
`official_reference.py` (the official computation re-implemented: fp32, NCHW, no cache, its
ordering of operations; the 1.0x baseline) and our tokenizer converted from them. Modes:

    official      the baseline
    unprepared    our tokenizer as `load_tokenizer` returns it, under no_grad (before issue 14)
    fp32          prepare_for_inference(InferenceOptions()): channels-last, inference mode
    bf16          ... (dtype="bf16"): networks in bf16, quantizer fp32
    fp32-compile, bf16-compile   the same with torch.compile (minutes of compile on 2 cores)

Repeats are interleaved over the modes; a speed-up is the median over repeats of the official
time divided by the mode's time in the same repeat (on a shared machine the load moves between
repeats); the best-of-repeats ratio is kept in the JSON too. Reported per stage and mode: best
seconds for all images, images/s, speed-up over the official code, peak memory above the
resident model (RSS high-water mark), achieved GFLOP/s of the network's FLOPs (counted once with
FlopCounterMode on our fp32 model) and that as a share of this machine's measured GEMM/conv
ceiling for the mode's dtype, index agreement with the official indices (per scale too) and, for
decode, the difference to the official image.

    python benchmarks/inference.py [--layouts clipb-256-enhanced,siglip-384] [--images 2]
        [--batch-size 2] [--repeats 2] [--modes official,unprepared,fp32,bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ceiling import measure_ceiling, peak_since, reset_peak
from official_reference import SPECS, build_pair, official_decode, official_encode, random_images
from torch.utils.flop_counter import FlopCounterMode

from tokenflow_cli.tokenizer.inference import InferenceOptions, inference_context, prepare_for_inference
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.scales import ScaleLayout

RESULTS = Path(__file__).resolve().parent / "results"
MODE_OPTIONS = {
    "fp32": InferenceOptions(),
    "bf16": InferenceOptions(dtype="bf16"),
    "fp32-compile": InferenceOptions(compile=True),
    "bf16-compile": InferenceOptions(dtype="bf16", compile=True),
}
Step = Callable[[torch.Tensor], torch.Tensor]


def mode_steps(mode: str, sd: dict, tok: TokenFlowTokenizer, layout: str) -> tuple[Step, Step]:
    """(encode images -> indices, decode indices -> fp32 images) for one mode."""
    spec = SPECS[layout]
    if mode == "official":
        return (lambda x: official_encode(sd, x, spec)), (lambda i: official_decode(sd, i, spec))
    if mode == "unprepared":
        return _wrapped(tok, torch.no_grad)
    return _wrapped(prepare_for_inference(copy.deepcopy(tok), MODE_OPTIONS[mode]), inference_context)


def _wrapped(tok: TokenFlowTokenizer, context: Callable) -> tuple[Step, Step]:
    def encode(x: torch.Tensor) -> torch.Tensor:
        with context():
            return tok.img_to_codes(x).indices

    def decode(idx: torch.Tensor) -> torch.Tensor:
        with context():
            return tok.codes_to_img(idx).float()

    return encode, decode


def batched(step: Step, data: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([step(data[i : i + batch_size]) for i in range(0, len(data), batch_size)])


def count_flops(step: Step, data: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        step(data)
    return counter.get_total_flops() / len(data)


def interleaved(steps: dict[str, Step], data: torch.Tensor, batch_size: int, repeats: int) -> dict:
    """Per mode: best seconds over repeats, every time, peak memory (first repeat) and outputs."""
    out = {m: {"times": [], "peak": 0, "output": None} for m in steps}
    for r in range(repeats):
        for mode, step in steps.items():
            base = reset_peak()
            t0 = time.perf_counter()
            result = batched(step, data, batch_size)
            out[mode]["times"].append(time.perf_counter() - t0)
            if r == 0:
                out[mode]["peak"], out[mode]["output"] = peak_since(base), result
            print(f"    {mode:13s} repeat {r}: {out[mode]['times'][-1]:7.2f} s", flush=True)
    return out


def agreement(idx: torch.Tensor, ref: torch.Tensor, scales: tuple[int, ...]) -> dict:
    layout = ScaleLayout(scales)
    per_scale = [float((idx[:, span] == ref[:, span]).float().mean()) for span in map(layout.span, range(len(scales)))]
    return {"index_agreement": float((idx == ref).float().mean()), "per_scale": per_scale}


def recon_difference(img: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max |difference|, PSNR over the [-1, 1] range (peak-to-peak 2) and the share of changed bytes."""
    mse = float((img - ref).pow(2).mean())
    to8 = lambda x: (127.5 * x + 128).clamp(0, 255).to(torch.uint8)  # noqa: E731  (the official bytes)
    return {"max_abs": float((img - ref).abs().max()), "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-20)),
            "uint8_changed": float((to8(img) != to8(ref)).float().mean())}  # fmt: skip


def run_layout(layout: str, args: argparse.Namespace) -> list[dict]:
    print(f"{layout}: building full-size random weights", flush=True)
    sd, tok = build_pair(layout)
    spec = SPECS[layout]
    images = random_images(args.images, spec.image_size)
    steps = {m: mode_steps(m, sd, tok, layout) for m in args.modes}
    for mode in (m for m in args.modes if "compile" in m):  # compile outside the timed runs
        t0 = time.perf_counter()
        steps[mode][1](steps[mode][0](images[: args.batch_size]))
        print(f"  {mode}: first batch (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    ours = _wrapped(tok, torch.no_grad)
    flops = {"encode": count_flops(ours[0], images[:1])}
    print(f"  encode: {flops['encode'] / 1e9:.1f} GFLOP per image (our network)", flush=True)
    enc = interleaved({m: s[0] for m, s in steps.items()}, images, args.batch_size, args.repeats)
    ref_idx = enc["official"]["output"] if "official" in enc else enc[args.modes[0]]["output"]
    flops["decode"] = count_flops(ours[1], ref_idx[:1])
    print(f"  decode: {flops['decode'] / 1e9:.1f} GFLOP per image (our network)", flush=True)
    dec = interleaved({m: s[1] for m, s in steps.items()}, ref_idx, args.batch_size, args.repeats)
    ref_img = dec["official"]["output"] if "official" in dec else dec[args.modes[0]]["output"]
    rows = []
    for stage, res in (("encode", enc), ("decode", dec)):
        base = res["official"]["times"] if "official" in res else [float("nan")] * args.repeats
        for mode, r in res.items():
            seconds = min(r["times"])
            dtype = "bfloat16" if mode.startswith("bf16") else "float32"
            gflops = flops[stage] * args.images / seconds / 1e9  # share_of_ceiling: set in main
            row = {"layout": layout, "stage": stage, "mode": mode, "images": args.images, "batch_size": args.batch_size,
                   "seconds": seconds, "all_seconds": r["times"], "images_per_s": args.images / seconds,
                   "speedup_vs_official": statistics.median(b / t for b, t in zip(base, r["times"])),
                   "speedup_best_vs_best": min(base) / seconds, "peak_mb": r["peak"] / 2**20,
                   "gflop_per_image": flops[stage] / 1e9, "gflops": gflops, "dtype": dtype}  # fmt: skip
            if stage == "encode":
                row.update(agreement(r["output"], ref_idx, spec.scales))
            else:
                row.update(recon_difference(r["output"], ref_img))
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'layout':19s} {'stage':6s} {'mode':13s} {'s/img':>7s} {'img/s':>6s} {'vs off':>6s} {'GFLOP/s':>8s} "
    print("\n" + head + f"{'ceil%':>6s} {'peak MB':>8s}  agreement / recon difference")
    for r in rows:
        quality = (
            f"indices {100 * r['index_agreement']:.3f}%"
            if r["stage"] == "encode"
            else f"max {r['max_abs']:.2g}, {r['psnr_db']:.1f} dB, bytes changed {100 * r['uint8_changed']:.2f}%"
        )
        print(f"{r['layout']:19s} {r['stage']:6s} {r['mode']:13s} {r['seconds'] / r['images']:7.2f} "
              f"{r['images_per_s']:6.2f} {r['speedup_vs_official']:5.2f}x {r['gflops']:8.1f} "
              f"{100 * r['share_of_ceiling']:5.1f}% {r['peak_mb']:8.0f}  {quality}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=",".join(SPECS))
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="official,unprepared,fp32,bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, default=RESULTS / "inference_cpu.json")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measuring the GEMM/conv ceiling", flush=True)
    ceiling = measure_ceiling()
    print("  " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()) + " GFLOP/s", flush=True)
    rows = [row for layout in args.layouts.split(",") for row in run_layout(layout, args)]
    again = measure_ceiling()  # a shared machine's load moves: the ceiling is the better of two
    ceiling = {k: max(v, again[k]) for k, v in ceiling.items()}
    for row in rows:
        row["share_of_ceiling"] = row["gflops"] / ceiling[f"ceiling_{row['dtype']}"]
    print("ceiling (best of start and end): " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()), flush=True)
    print_table(rows)
    report = {"command": "python benchmarks/inference.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k != "json"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "ceiling_gflops": ceiling, "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
