"""Does our trained refine block help over the official untrained in-place re-run? Same tiny
generator (the shipped default, trained with refine blocks), same prompts and seeds: GenEval on
the shapes world for one pass and for two and three passes under each multi-step mode.

    python benchmarks/multistep_geneval.py [--model RUN] [--n-per-tag 10] [--samples 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from tokenflow_cli.generation.geneval import run_geneval
from tokenflow_cli.generation.multistep import MULTI_STEP
from tokenflow_cli.generation.sampling import get_schedule
from tokenflow_cli.generation.text_to_image import GenerationSettings, resolve_generator

RUNS = [("one-pass", "refine"), ("two-pass", "refine"), ("two-pass", "inplace"), ("three-pass", "refine"),
        ("three-pass", "inplace")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator run folder (default: the shipped tiny one)")
    parser.add_argument("--n-per-tag", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/multistep_geneval.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = resolve_generator(args.model, torch.device("cpu"))
    rows = []
    print(f"generator: {loaded.source}")
    print(f"{'schedule':<12}{'multi-step':<12}{'overall':>9}  per tag")
    for schedule, mode in RUNS:
        loaded.model.multi_step = MULTI_STEP[mode]
        settings = GenerationSettings(get_schedule(schedule), cfg=args.cfg, seed=0, samples_per_prompt=args.samples)
        with tempfile.TemporaryDirectory() as out:
            report = run_geneval(loaded, settings, out, n_per_tag=args.n_per_tag)
        rows.append({"schedule": schedule, "multi_step": mode, "overall": report["overall"],
                     "tags": report["per_tag"], "images": report["prompts"] * args.samples})
        tags = " ".join(f"{k} {v:.3f}" for k, v in report["per_tag"].items())
        print(f"{schedule:<12}{mode:<12}{report['overall']:>9.3f}  {tags}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"generator": loaded.source, "cfg": args.cfg, "runs": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
