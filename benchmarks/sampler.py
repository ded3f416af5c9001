"""Sampler speed: ours (KV cache for every pass, incremental next-scale inputs, CFG as one
doubled batch) against a recompute-all official-style sampler on the same model and seed
(`generate(use_cache=False)`: the whole sequence through the LM at every sampler call and the
next-scale inputs rebuilt from all codes drawn so far, as the official `autoregressive_infer_cfg`
does; it is kinder than the official one in one way: the image head runs on the new positions
only, not the full 64769-id vocabulary at every position). Both give the same codes up to float
rounding: the table shows whether they are identical, the share of tokens that agree, and the
largest teacher-forced logit gap between the cached and the one-pass computation (a random
7B-wide model has flat logits, so a 1e-6 gap can flip a draw and everything after it).

Configs (random weights: speed does not depend on them):
- `tiny`: generator-tiny.yaml over the tiny tokenizer's scales (7 scales, 521 tokens, K 1024),
  our layout (var inputs, trained refine block);
- `tiny-official`: generator-tiny-official.yaml (the official layout) on the same code space;
- `7b-shaped`: the official t2i layout at the real width (4096, 32 heads, SwiGLU 11008) with
  `--layers` layers (default 2) over the clipb-256 scales (9 scales, 817 tokens, K 32768) and
  the official 128-id prompt + `<img>`.

    python benchmarks/sampler.py [--configs tiny,tiny-official,7b-shaped] [--batch 4] [--layers 2]
                                 [--schedules one-pass,two-pass] [--repeats 3] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from tokenflow_cli.config import load_recipe
from tokenflow_cli.generation.config import GeneratorModelConfig, GeneratorRecipe, attach_code_space
from tokenflow_cli.generation.model import NextScaleGenerator, TextBatch, build_generator
from tokenflow_cli.generation.sampling import get_schedule
from tokenflow_cli.tokenizer.config import QuantizerConfig, TokenizerRecipe
from tokenflow_cli.tokenizer.quantizer import MultiScaleDualQuantizer

OFFICIAL_MARKER = (529, 2492, 29958)  # stand-ins for the 3 text ids of `<img>` (only the length matters here)


class RandomCodeSpace:
    """The code embedder interface over a randomly initialised quantizer."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        self.quantizer = MultiScaleDualQuantizer(cfg).eval()
        self.scales, self.codebook_size = tuple(cfg.scales), cfg.codebook_size
        self.code_dim = cfg.semantic_dim + cfg.pixel_dim

    def lookup_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(idx_Bl)


def _config(name: str, layers: int) -> tuple[GeneratorModelConfig, RandomCodeSpace]:
    if name.startswith("tiny"):
        quantizer = load_recipe("tiny", TokenizerRecipe).model.quantizer
        recipe = "generator-tiny-official" if name == "tiny-official" else "generator-tiny"
        model = load_recipe(recipe, GeneratorRecipe).model
    else:
        quantizer = load_recipe("clipb-256", TokenizerRecipe).model.quantizer
        model = dataclasses.replace(load_recipe("generator-t2i-official", GeneratorRecipe).model, num_layers=layers,
                                    lm_dtype="fp32", gradient_checkpointing=False, text_vocab_size=32001,
                                    image_marker_ids=OFFICIAL_MARKER)
    space = RandomCodeSpace(quantizer)
    return attach_code_space(model, space.scales, space.codebook_size, space.code_dim), space


def _text(model: NextScaleGenerator, batch: int, seed: int) -> TextBatch:
    cfg = model.config
    T = cfg.max_text_tokens + max(len(cfg.image_marker_ids) - 1, 0)
    ids = torch.randint(1, cfg.text_vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))
    return TextBatch(ids, torch.ones_like(ids))


def _timed(model, space, text, negative, schedule, use_cache: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    codes = model.generate(space, text, negative, schedule, cfg=7.5, generator=torch.Generator().manual_seed(0),
                           use_cache=use_cache, keep_ties=True)
    return time.perf_counter() - start, codes


def _logit_gap(model: NextScaleGenerator, space: RandomCodeSpace, text: TextBatch) -> float:
    """Largest |cached step-by-step - one full pass| teacher-forced logit on random codes: the
    float-rounding gap that can flip a near-tie draw (random wide models have flat logits)."""
    codes = torch.randint(0, space.codebook_size, (text.ids_BT.shape[0], model.num_image_tokens),
                          generator=torch.Generator().manual_seed(3))
    inputs = model.scale_inputs(space, codes)
    full = model(text, inputs).logits_BLK
    return float((model.stepwise_logits(text, inputs, use_cache=True) - full).abs().max())


def bench(name: str, layers: int, batch: int, schedules: list[str], repeats: int) -> list[dict]:
    cfg, space = _config(name, layers)
    torch.manual_seed(0)
    model = build_generator(cfg).eval()
    text, negative = _text(model, batch, 1), _text(model, batch, 2)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with torch.inference_mode():
        gap = _logit_gap(model, space, text)
        if name.startswith("tiny"):  # warm up the kernels (the big config is long enough without)
            _timed(model, space, text, negative, get_schedule("one-pass"), True)
        for schedule_name in schedules:
            schedule = get_schedule(schedule_name)
            ours, baseline = float("inf"), float("inf")
            for _ in range(repeats):  # interleaved, the fastest of each: a shared machine is noisy
                seconds, a = _timed(model, space, text, negative, schedule, True)
                ours = min(ours, seconds)
                seconds, b = _timed(model, space, text, negative, schedule, False)
                baseline = min(baseline, seconds)
            rows.append({"config": name, "schedule": schedule_name, "batch": batch, "layers": cfg.num_layers,
                         "hidden": cfg.hidden_size, "parameters": params, "tokens": int(sum(s * s for s in cfg.scales)),
                         "ours_s": round(ours, 3), "recompute_all_s": round(baseline, 3),
                         "speedup": round(baseline / ours, 2), "same_codes": bool(torch.equal(a, b)),
                         "codes_agree": round(float((a == b).float().mean()), 4), "logit_gap": gap})
            r = rows[-1]
            print(f"{name:<14}{schedule_name:<12}{batch:>3}{cfg.num_layers:>4}{ours:>10.2f}{baseline:>12.2f}"
                  f"{r['speedup']:>9.2f}x  {r['same_codes']!s:<6}{r['codes_agree']:>7.4f}{gap:>10.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,tiny-official,7b-shaped")
    parser.add_argument("--schedules", default="one-pass,two-pass,three-pass")
    parser.add_argument("--big-schedules", default="one-pass,two-pass", help="schedules of the 7b-shaped config")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--big-batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (the fastest is reported)")
    parser.add_argument("--big-repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sampler_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'config':<14}{'schedule':<12}{'B':>3}{'L':>4}{'ours s':>10}{'recompute s':>12}{'speedup':>10}  "
          f"same  agree  logit gap")
    rows = []
    for name in args.configs.split(","):
        big = name == "7b-shaped"
        rows += bench(name, args.layers, args.big_batch if big else args.batch,
                      (args.big_schedules if big else args.schedules).split(","),
                      args.big_repeats if big else args.repeats)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "cfg": 7.5, "dtype": "fp32", "load_average": os.getloadavg(), "repeats": args.repeats}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
