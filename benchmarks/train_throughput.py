"""Training throughput of the tokenizer and generator recipes on this machine (issue 12).

Each case is a recipe plus overrides, trained through the generic loop's own optimizer step
(`train/loop.py`: autocast, backward, clipping, AdamW) on a small shapes world rendered here.
The cases run interleaved, `--rounds` times `--steps` timed steps each after one warm-up step,
so a neighbour's load on a shared CPU hits every case alike; the table shows the median seconds
per step, steps/s, images/s and the images/s ratio to the first case of the same stage (the
baseline: the shipped tiny recipes in fp32). Generator cases encode their images at start-up
with their tokenizer (`data.tokenizer`: the default tokenizer, or a recipe name = random init,
which costs the same per step).

On CUDA (`--device cuda --suite gpu`) the cases are one step of the full-size clipb-256 tokenizer
(random semantic tower and teacher, random LPIPS backbone: the same cost) and of the 7B-shaped
t2i generator (the official block at full width, `--layers` layers, bf16 weights and autocast,
the FSDP recipe settings; one process runs it unsharded) over a random-init clipb-256
tokenizer's codes. `--batch-sizes` sweeps train.batch_size; every row adds the FLOPs of one
step (FlopCounterMode: forward and backward), TFLOP/s, its share of the bf16 ceiling measured
in the same run, and the peak memory of the timed steps (CUDA allocator, or RSS on CPU).

    python benchmarks/train_throughput.py [--threads 2] [--rounds 3] [--steps 4] [--quick]
        [--only tokenizer|generator] [--suite cpu|gpu|smoke] [--device cpu|cuda] [--batch-sizes 8,16]
        [--layers 2] [--json benchmarks/results/train_throughput_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ceiling import ceiling_of, device_name, measure_ceiling, peak_total, reset_peak, sync
from torch.utils.flop_counter import FlopCounterMode

from tokenflow_cli.config import load_recipe
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.generation.config import GeneratorRecipe
from tokenflow_cli.generation.stage import GeneratorStage
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.stage import TokenizerStage
from tokenflow_cli.train.loop import _Loop
from tokenflow_cli.train.progress import TrainProgress


@dataclass
class Case:
    label: str
    stage: str  # "tokenizer" or "generator"
    recipe: str
    overrides: list[str] = field(default_factory=list)
    image_size: int = 64  # the shapes world it trains on


def cases() -> list[Case]:
    toy_tok = ["data.tokenizer=shapes-toy"]
    return [
        Case("tiny fp32 (baseline)", "tokenizer", "tiny", ["train.precision=fp32"]),
        Case("tiny bf16", "tokenizer", "tiny", ["train.precision=bf16"]),
        Case("shapes-toy fp32", "tokenizer", "shapes-toy", ["train.precision=fp32"], 32),
        Case("shapes-toy bf16", "tokenizer", "shapes-toy", ["train.precision=bf16"], 32),
        Case("generator-tiny fp32 (baseline)", "generator", "generator-tiny", ["train.precision=fp32"]),
        Case("generator-tiny bf16", "generator", "generator-tiny", ["train.precision=bf16"]),
        Case("generator-toy fp32 sdpa", "generator", "generator-toy",
             [*toy_tok, "train.precision=fp32", "model.attn_implementation=sdpa"], 32),
        Case("generator-toy bf16 sdpa", "generator", "generator-toy",
             [*toy_tok, "train.precision=bf16", "model.attn_implementation=sdpa"], 32),
        Case("generator-toy (bf16 eager)", "generator", "generator-toy", toy_tok, 32),
    ]


# clipb-256 without downloadable weights: random towers and LPIPS backbone cost the same per step
RANDOM_TOWERS = ["model.semantic_encoder.pretrained=", "model.teacher.pretrained=",
                 "train.loss.lpips_random_backbone=true"]
RANDOM_CLIPB_256 = "base: clipb-256\nmodel:\n  semantic_encoder: {pretrained: ''}\n  teacher: {pretrained: ''}\n"


def gpu_cases(workdir: Path, layers: int) -> list[Case]:
    """Full-size cases: clipb-256 tokenizer and the 7B-shaped t2i generator, bf16."""
    clipb = workdir / "clipb-256-random.yaml"
    clipb.write_text(RANDOM_CLIPB_256)
    generator = [f"data.tokenizer={clipb}", "data.text_tokenizer=", f"model.num_layers={layers}",
                 "train.precision=bf16", "train.distributed=fsdp", "model.gradient_checkpointing=false"]
    return [Case("clipb-256 bf16", "tokenizer", "clipb-256", [*RANDOM_TOWERS, "train.precision=bf16"], 256),
            Case(f"7b-shaped t2i bf16 ({layers} layers)", "generator", "generator-t2i-official", generator, 256)]


def smoke_cases(workdir: Path, layers: int) -> list[Case]:
    """The gpu suite's plumbing at toy size (make test runs it through scripts/device_check.sh)."""
    generator = ["data.text_tokenizer=", f"model.num_layers={layers}", "model.hidden_size=64", "model.num_heads=2",
                 "model.num_kv_heads=2", "model.intermediate_size=128", "model.lm_dtype=fp32",
                 "train.precision=bf16", "train.distributed=fsdp", "model.gradient_checkpointing=false",
                 "data.tokenizer=tiny", "data.num_workers=0"]
    return [Case("tiny bf16", "tokenizer", "tiny", ["train.precision=bf16"]),
            Case("t2i-official layout, toy width", "generator", "generator-t2i-official", generator, 64)]


class Runner:
    """One case's stage inside the generic loop, stepped a few optimizer steps at a time."""

    def __init__(self, case: Case, world: Path, run_dir: Path, device: str = "cpu") -> None:
        images, captions = world / "images", world / "captions.jsonl"
        if case.stage == "tokenizer":
            recipe = load_recipe(case.recipe, TokenizerRecipe, [f"data.train={images}", *case.overrides])
            stage = TokenizerStage(recipe)
        else:
            recipe = load_recipe(case.recipe, GeneratorRecipe,
                                 [f"data.images={images}", f"data.captions={captions}", *case.overrides])
            stage = GeneratorStage(recipe, run_dir)
        self.batch_size = recipe.train.batch_size
        # the loop's own step (not its run(): that would train to the end without pausing)
        self.loop = _Loop(stage, recipe.train, run_dir, recipe, device, False,
                          TrainProgress(run_dir, recipe.train.steps, None, live=False), False)
        for module in stage.modules().values():
            module.train()
        self.batches = iter(self.loop.loader)
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds per optimizer step over `steps` steps."""
        sync(self.loop.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.loop._one_step(self.batches, self.step)
            self.step += 1
        sync(self.loop.device)
        return (time.perf_counter() - start) / steps

    def count_flops(self) -> float:
        """FLOPs of one optimizer step (forward and backward; FlopCounterMode counts matmuls and convs)."""
        with FlopCounterMode(display=False) as counter:
            self.run(1)
        return counter.get_total_flops()


def measure(selected: list[Case], rounds: int, steps: int, workdir: Path, device: str = "cpu") -> list[dict[str, Any]]:
    worlds = {}
    for size in sorted({c.image_size for c in selected}):
        worlds[size] = workdir / f"shapes-{size}"
        render_shapes_world(worlds[size], 256, seed=0, size=size)
    rows, baselines = [], {}
    for i, case in enumerate(selected):  # one case at a time: a full-size model per case fits, not all
        runner = Runner(case, worlds[case.image_size], workdir / f"run-{i}", device)
        runner.run(1)  # warm-up: first-call allocations, lazy inits, cuDNN autotuning
        flop = runner.count_flops()
        base = reset_peak(device)
        times = [runner.run(steps) for _ in range(rounds)]
        peak, resident = peak_total(device), base
        s = statistics.median(times)
        batch = runner.batch_size
        row = {"case": case.label, "stage": case.stage, "recipe": case.recipe, "overrides": case.overrides,
               "image_size": case.image_size, "batch_size": batch, "device": str(device), "s_per_step": s,
               "steps_per_s": 1 / s, "images_per_s": batch / s, "rounds_s_per_step": times,
               "tflop_per_step": flop / 1e12, "tflops": flop / s / 1e12, "peak_mb": peak / 2**20,
               "resident_mb": resident / 2**20}
        baselines.setdefault(case.stage, row["images_per_s"])
        row["images_per_s_ratio"] = row["images_per_s"] / baselines[case.stage]
        rows.append(row)
        del runner
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':34s} {'px':>3s} {'batch':>5s} {'s/step':>7s} {'steps/s':>8s} {'img/s':>8s} {'x base':>7s} "
          f"{'TFLOP/s':>8s} {'ceil%':>6s} {'peak MB':>8s}")
    for r in rows:
        print(f"{r['case']:34s} {r['image_size']:3d} {r['batch_size']:5d} {r['s_per_step']:7.3f} "
              f"{r['steps_per_s']:8.2f} {r['images_per_s']:8.1f} {r['images_per_s_ratio']:7.2f} "
              f"{r['tflops']:8.2f} {100 * r.get('share_of_ceiling', 0):5.1f}% {r['peak_mb']:8.0f}")


def _has_avx512_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "avx512_bf16" in cpuinfo.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=["tokenizer", "generator"], default=None)
    parser.add_argument("--suite", choices=["cpu", "gpu", "smoke"], default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="", help="comma list: train.batch_size of every case (a sweep)")
    parser.add_argument("--layers", type=int, default=2, help="LM layers of the 7B-shaped generator")
    parser.add_argument("--ceiling-size", type=int, default=0, help="GEMM size of the ceiling (0: per device)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 step (a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ceiling = measure_ceiling(size=args.ceiling_size, device=args.device)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        suite = {"cpu": lambda: cases(), "gpu": lambda: gpu_cases(Path(tmp), args.layers),
                 "smoke": lambda: smoke_cases(Path(tmp), args.layers)}[args.suite]()
        selected = [c for c in suite if args.only in (None, c.stage)]
        if args.batch_sizes:
            selected = [Case(f"{c.label} b{b}", c.stage, c.recipe, [*c.overrides, f"train.batch_size={b}"],
                             c.image_size) for c in selected for b in args.batch_sizes.split(",")]
        rows = measure(selected, args.rounds, args.steps, Path(tmp), args.device)
    for row in rows:  # autocast runs the matmuls in bf16 where the recipe says so
        precision = next((o.split("=")[1] for o in row["overrides"] if o.startswith("train.precision=")), "fp32")
        row["share_of_ceiling"] = row["tflops"] * 1e3 / ceiling_of(ceiling, precision)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": _has_avx512_bf16(),
               "device": device_name(args.device), "ceiling_gflops": ceiling, "suite": args.suite,
               "rounds": args.rounds, "steps": args.steps}
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
