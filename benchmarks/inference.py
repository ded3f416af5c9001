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
    tf32          fp32 networks with TF32 matmuls/convolutions allowed (CUDA; on CPU the same as fp32)

On CUDA (`--device cuda`) every fp32 mode runs with TF32 off (PyTorch lets cuDNN use TF32 by
default), so `official` and `fp32` are true fp32 and must give the CPU's indices; `--batch-sizes`
sweeps the batch (each point times max(--images, batch) images; compile modes run at the largest
batch only, since each new shape recompiles); peak memory is the CUDA allocator's peak above the
resident models; a batch that runs out of memory is recorded as such and the sweep goes on.

Repeats are interleaved over the modes; a speed-up is the median over repeats of the official
time divided by the mode's time in the same repeat (on a shared machine the load moves between
repeats); the best-of-repeats ratio is kept in the JSON too. Reported per stage and mode: best
seconds for all images, images/s, speed-up over the official code, peak memory above the
resident model (RSS high-water mark), achieved GFLOP/s of the network's FLOPs (counted once with
FlopCounterMode on our fp32 model) and that as a share of this machine's measured GEMM/conv
ceiling for the mode's dtype, index agreement with the official indices (per scale too) and, for
decode, the difference to the official image.

    python benchmarks/inference.py [--layouts clipb-256-enhanced,siglip-384] [--images 2]
        [--batch-size 2 | --batch-sizes 16,64] [--repeats 2] [--modes official,unprepared,fp32,bf16]
        [--device cpu|cuda] [--json PATH]
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
from ceiling import ceiling_of, device_name, measure_ceiling, peak_since, reset_peak, sync, tf32
from official_reference import SPECS, build_pair, official_decode, official_encode, random_images
from torch.utils.flop_counter import FlopCounterMode

from tokenflow_cli.config import load_recipe
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.inference import InferenceOptions, inference_context, prepare_for_inference
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer, build_tokenizer
from tokenflow_cli.tokenizer.scales import ScaleLayout

RESULTS = Path(__file__).resolve().parent / "results"
MODE_OPTIONS = {
    "fp32": InferenceOptions(),
    "bf16": InferenceOptions(dtype="bf16"),
    "fp32-compile": InferenceOptions(compile=True),
    "bf16-compile": InferenceOptions(dtype="bf16", compile=True),
    "tf32": InferenceOptions(),
}
CPU_MODES, CUDA_MODES = "official,unprepared,fp32,bf16", "official,fp32,tf32,bf16"
Step = Callable[[torch.Tensor], torch.Tensor]


def mode_dtype(mode: str) -> str:
    """The precision a mode's matmuls run in: what its achieved rate is a share of."""
    return "bfloat16" if mode.startswith("bf16") else "tf32" if mode.startswith("tf32") else "float32"


def build_layout(layout: str) -> tuple[dict | None, TokenFlowTokenizer]:
    """A released layout: the official random weights and our converted tokenizer; any other
    name is a recipe (e.g. `tiny`, for smoke runs): our tokenizer at random init, no official mode."""
    if layout in SPECS:
        return build_pair(layout)
    torch.manual_seed(0)
    return None, build_tokenizer(load_recipe(layout, TokenizerRecipe).model).eval()


def mode_steps(mode: str, sd: dict, tok: TokenFlowTokenizer, layout: str) -> tuple[Step, Step]:
    """(encode images -> indices, decode indices -> fp32 images) for one mode."""
    if mode == "official":
        spec = SPECS[layout]
        return _in_tf32(False, lambda x: official_encode(sd, x, spec)), _in_tf32(
            False, lambda i: official_decode(sd, i, spec))
    if mode == "unprepared":
        return _wrapped(tok, torch.no_grad, False)
    tok = prepare_for_inference(copy.deepcopy(tok), MODE_OPTIONS[mode])
    return _wrapped(tok, inference_context, mode.startswith("tf32"))


def _in_tf32(allowed: bool, step: Step) -> Step:
    def run(x: torch.Tensor) -> torch.Tensor:
        with tf32(allowed), torch.no_grad():
            return step(x)

    return run


def _wrapped(tok: TokenFlowTokenizer, context: Callable, allow_tf32: bool) -> tuple[Step, Step]:
    def encode(x: torch.Tensor) -> torch.Tensor:
        with context(), tf32(allow_tf32):
            return tok.img_to_codes(x).indices

    def decode(idx: torch.Tensor) -> torch.Tensor:
        with context(), tf32(allow_tf32):
            return tok.codes_to_img(idx).float()

    return encode, decode


def batched(step: Step, data: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([step(data[i : i + batch_size]) for i in range(0, len(data), batch_size)])


def count_flops(step: Step, data: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        step(data)
    return counter.get_total_flops() / len(data)


def interleaved(steps: dict[str, Step], data: torch.Tensor, batch_size: int, repeats: int) -> dict:
    """Per mode: best seconds over repeats, every time, peak memory (first repeat) and outputs.
    On CUDA the first batch of every mode runs once untimed first (cuDNN autotuning, allocator)."""
    out = {m: {"times": [], "peak": 0, "output": None} for m in steps}
    if data.device.type == "cuda":
        for step in steps.values():
            step(data[:batch_size])
    for r in range(repeats):
        for mode, step in steps.items():
            base = reset_peak(data.device)
            t0 = time.perf_counter()
            result = batched(step, data, batch_size)
            sync(data.device)
            out[mode]["times"].append(time.perf_counter() - t0)
            if r == 0:
                out[mode]["peak"], out[mode]["output"] = peak_since(base, data.device), result
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
    sd, tok = build_layout(layout)
    tok = tok.to(args.device)
    if sd is not None:
        sd = {k: v.to(args.device) for k, v in sd.items()}
    ours = _wrapped(tok, torch.no_grad, False)
    flops = {"encode": count_flops(ours[0], random_images(1, tok.image_size).to(args.device))}
    print(f"  encode: {flops['encode'] / 1e9:.1f} GFLOP per image (our network)", flush=True)
    steps = {m: mode_steps(m, sd, tok, layout) for m in args.modes if sd is not None or m != "official"}
    rows = []
    for batch_size in args.batch_sizes:
        modes = [m for m in args.modes if "compile" not in m or batch_size == max(args.batch_sizes)]
        try:
            rows += run_point(layout, tok, {m: steps[m] for m in modes if m in steps}, flops, batch_size, ours, args)
        except torch.cuda.OutOfMemoryError as err:
            print(f"  batch {batch_size}: out of memory ({str(err).splitlines()[0]})", flush=True)
            rows.append({"layout": layout, "batch_size": batch_size, "error": "out of memory"})
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_point(layout: str, tok: TokenFlowTokenizer, steps: dict[str, tuple[Step, Step]], flops: dict,
              batch_size: int, ours: tuple[Step, Step], args: argparse.Namespace) -> list[dict]:
    """Encode then decode at one batch size in every mode; one row per (stage, mode)."""
    n = max(args.images, batch_size)
    images = random_images(n, tok.image_size).to(args.device)
    print(f"  batch {batch_size}, {n} images", flush=True)
    for mode in (m for m in steps if "compile" in m):  # compile outside the timed runs
        t0 = time.perf_counter()
        steps[mode][1](steps[mode][0](images[:batch_size]))
        sync(args.device)
        print(f"  {mode}: first batch (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    enc = interleaved({m: s[0] for m, s in steps.items()}, images, batch_size, args.repeats)
    ref_idx = enc["official"]["output"] if "official" in enc else enc[next(iter(steps))]["output"]
    if "decode" not in flops:
        flops["decode"] = count_flops(ours[1], ref_idx[:1])
        print(f"  decode: {flops['decode'] / 1e9:.1f} GFLOP per image (our network)", flush=True)
    dec = interleaved({m: s[1] for m, s in steps.items()}, ref_idx, batch_size, args.repeats)
    ref_img = dec["official"]["output"] if "official" in dec else dec[next(iter(steps))]["output"]
    rows = []
    for stage, res in (("encode", enc), ("decode", dec)):
        base = res["official"]["times"] if "official" in res else [float("nan")] * args.repeats
        for mode, r in res.items():
            seconds = min(r["times"])
            gflops = flops[stage] * n / seconds / 1e9  # share_of_ceiling: set in main
            row = {"layout": layout, "stage": stage, "mode": mode, "images": n, "batch_size": batch_size,
                   "device": str(args.device), "seconds": seconds, "all_seconds": r["times"],
                   "images_per_s": n / seconds,
                   "speedup_vs_official": statistics.median(b / t for b, t in zip(base, r["times"])),
                   "speedup_best_vs_best": min(base) / seconds, "peak_mb": r["peak"] / 2**20,
                   "gflop_per_image": flops[stage] / 1e9, "gflops": gflops, "dtype": mode_dtype(mode)}  # fmt: skip
            if stage == "encode":
                row.update(agreement(r["output"].cpu(), ref_idx.cpu(), tok.scales))
            else:
                row.update(recon_difference(r["output"], ref_img))
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'layout':19s} {'stage':6s} {'mode':13s} {'batch':>5s} {'img/s':>8s} {'vs off':>6s} {'GFLOP/s':>9s} "
    print("\n" + head + f"{'ceil%':>6s} {'peak MB':>8s}  agreement / recon difference")
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:19s} batch {r['batch_size']}: {r['error']}")
            continue
        quality = (
            f"indices {100 * r['index_agreement']:.3f}%"
            if r["stage"] == "encode"
            else f"max {r['max_abs']:.2g}, {r['psnr_db']:.1f} dB, bytes changed {100 * r['uint8_changed']:.2f}%"
        )
        print(f"{r['layout']:19s} {r['stage']:6s} {r['mode']:13s} {r['batch_size']:5d} "
              f"{r['images_per_s']:8.2f} {r['speedup_vs_official']:5.2f}x {r['gflops']:9.1f} "
              f"{100 * r['share_of_ceiling']:5.1f}% {r['peak_mb']:8.0f}  {quality}")  # fmt: skip


def write_report(args: argparse.Namespace, ceiling: dict, rows: list[dict]) -> None:
    for row in rows:
        if "gflops" in row:
            row["share_of_ceiling"] = row["gflops"] / ceiling_of(ceiling, row["dtype"])
    report = {"command": "python benchmarks/inference.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("json", "batch_size")),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device_name(args.device),
        "machine": platform.processor() or platform.machine(), "ceiling_gflops": ceiling, "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=",".join(SPECS))
    parser.add_argument("--images", type=int, default=2, help="images per point (at least one batch)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batch-sizes", default="", help="comma list to sweep (default: --batch-size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="", help=f"default {CPU_MODES} (CPU), {CUDA_MODES} (CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--ceiling-size", type=int, default=0, help="GEMM size of the ceiling (0: per device)")
    parser.add_argument("--json", type=Path, default=RESULTS / "inference_cpu.json")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.modes = (args.modes or (CUDA_MODES if args.device.type == "cuda" else CPU_MODES)).split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {device_name(args.device)}, {torch.get_num_threads()} threads; "
          "measuring the GEMM/conv ceiling", flush=True)
    ceiling = measure_ceiling(size=args.ceiling_size, device=args.device)
    print("  " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()) + " GFLOP/s", flush=True)
    rows: list[dict] = []
    for layout in args.layouts.split(","):
        rows += run_layout(layout, args)
        write_report(args, ceiling, rows)  # after every layout: a killed run keeps what it measured
    again = measure_ceiling(size=args.ceiling_size, device=args.device)  # the load moves: the better of two
    ceiling = {k: max(v, again[k]) for k, v in ceiling.items()}
    print("ceiling (best of start and end): " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()), flush=True)
    write_report(args, ceiling, rows)
    print_table(rows)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
