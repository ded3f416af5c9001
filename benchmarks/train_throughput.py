"""Training throughput of the tokenizer and generator recipes on this machine (issue 12).

Each case is a recipe plus overrides, trained through the generic loop's own optimizer step
(`train/loop.py`: autocast, backward, clipping, AdamW) on a small shapes world rendered here.
The cases run interleaved, `--rounds` times `--steps` timed steps each after one warm-up step,
so a neighbour's load on a shared CPU hits every case alike; the table shows the median seconds
per step, steps/s, images/s and the images/s ratio to the first case of the same stage (the
baseline: the shipped tiny recipes in fp32). Generator cases encode their images at start-up
with their tokenizer (`data.tokenizer`: the default tokenizer, or a recipe name = random init,
which costs the same per step).

    python benchmarks/train_throughput.py [--threads 2] [--rounds 3] [--steps 4] [--quick]
        [--only tokenizer|generator] [--json benchmarks/results/train_throughput_cpu.json]
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


class Runner:
    """One case's stage inside the generic loop, stepped a few optimizer steps at a time."""

    def __init__(self, case: Case, world: Path, run_dir: Path) -> None:
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
        self.loop = _Loop(stage, recipe.train, run_dir, recipe, "cpu", False,
                          TrainProgress(run_dir, recipe.train.steps, None, live=False), False)
        for module in stage.modules().values():
            module.train()
        self.batches = iter(self.loop.loader)
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds per optimizer step over `steps` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self.loop._one_step(self.batches, self.step)
            self.step += 1
        return (time.perf_counter() - start) / steps


def measure(selected: list[Case], rounds: int, steps: int, workdir: Path) -> list[dict[str, Any]]:
    worlds = {}
    for size in sorted({c.image_size for c in selected}):
        worlds[size] = workdir / f"shapes-{size}"
        render_shapes_world(worlds[size], 256, seed=0, size=size)
    runners = {}
    for i, case in enumerate(selected):
        runners[case.label] = Runner(case, worlds[case.image_size], workdir / f"run-{i}")
        runners[case.label].run(1)  # warm-up: first-call allocations, lazy inits
    times: dict[str, list[float]] = {c.label: [] for c in selected}
    for _ in range(rounds):
        for case in selected:
            times[case.label].append(runners[case.label].run(steps))
    rows, baselines = [], {}
    for case in selected:
        s = statistics.median(times[case.label])
        batch = runners[case.label].batch_size
        row = {"case": case.label, "stage": case.stage, "recipe": case.recipe, "overrides": case.overrides,
               "image_size": case.image_size, "batch_size": batch, "s_per_step": s, "steps_per_s": 1 / s,
               "images_per_s": batch / s, "rounds_s_per_step": times[case.label]}
        baselines.setdefault(case.stage, row["images_per_s"])
        row["images_per_s_ratio"] = row["images_per_s"] / baselines[case.stage]
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':34s} {'px':>3s} {'batch':>5s} {'s/step':>7s} {'steps/s':>8s} {'img/s':>8s} {'x base':>7s}")
    for r in rows:
        print(f"{r['case']:34s} {r['image_size']:3d} {r['batch_size']:5d} {r['s_per_step']:7.3f} "
              f"{r['steps_per_s']:8.2f} {r['images_per_s']:8.1f} {r['images_per_s_ratio']:7.2f}")


def _has_avx512_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "avx512_bf16" in cpuinfo.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=["tokenizer", "generator"], default=None)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 step (a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    selected = [c for c in cases() if args.only in (None, c.stage)]
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        rows = measure(selected, args.rounds, args.steps, Path(tmp))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": _has_avx512_bf16(),
               "rounds": args.rounds, "steps": args.steps}
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
