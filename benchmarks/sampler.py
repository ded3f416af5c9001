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

On CUDA (`--device cuda`, `--dtype bf16|fp32`; fp32 with TF32 off) the table adds tokens/s of the
cached sampler (image tokens drawn per second, each pass counted once), its peak memory (the
allocator's, model included), the FLOPs it executes (FlopCounterMode over one cached run, CFG's
doubled batch included) as TFLOP/s and as a share of the GEMM ceiling measured in the same run.
`--batch` / `--big-batch` take comma lists to sweep.

    python benchmarks/sampler.py [--configs tiny,tiny-official,7b-shaped] [--batch 4] [--layers 2]
                                 [--schedules one-pass,two-pass] [--repeats 3] [--threads N]
                                 [--device cpu|cuda] [--dtype fp32|bf16] [--json PATH]
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
from ceiling import ceiling_of, device_name, measure_ceiling, peak_total, reset_peak, sync, tf32
from torch.utils.flop_counter import FlopCounterMode

from tokenflow_cli.config import load_recipe
from tokenflow_cli.device import dtype_of
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


def _text(model: NextScaleGenerator, batch: int, seed: int, device: torch.device) -> TextBatch:
    cfg = model.config
    T = cfg.max_text_tokens + max(len(cfg.image_marker_ids) - 1, 0)
    ids = torch.randint(1, cfg.text_vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))
    return TextBatch(ids.to(device), torch.ones_like(ids).to(device))


def _timed(model, space, text, negative, schedule, use_cache: bool) -> tuple[float, torch.Tensor]:
    device = text.ids_BT.device
    sync(device)
    start = time.perf_counter()
    codes = model.generate(space, text, negative, schedule, cfg=7.5,
                           generator=torch.Generator(device).manual_seed(0), use_cache=use_cache, keep_ties=True)
    sync(device)
    return time.perf_counter() - start, codes


def _logit_gap(model: NextScaleGenerator, space: RandomCodeSpace, text: TextBatch) -> float:
    """Largest |cached step-by-step - one full pass| teacher-forced logit on random codes: the
    float-rounding gap that can flip a near-tie draw (random wide models have flat logits)."""
    codes = torch.randint(0, space.codebook_size, (text.ids_BT.shape[0], model.num_image_tokens),
                          generator=torch.Generator().manual_seed(3)).to(text.ids_BT.device)
    inputs = model.scale_inputs(space, codes)
    full = model(text, inputs).logits_BLK
    return float((model.stepwise_logits(text, inputs, use_cache=True) - full).abs().max())


def bench(name: str, layers: int, batch: int, schedules: list[str], repeats: int, device: torch.device,
          dtype: str, ceiling: dict) -> list[dict]:
    cfg, space = _config(name, layers)
    torch.manual_seed(0)
    model = build_generator(cfg).eval().to(device, dtype_of(dtype))
    space.quantizer.to(device)  # the codebooks stay fp32 (the code search's precision)
    text, negative = _text(model, batch, 1, device), _text(model, batch, 2, device)
    params = sum(p.numel() for p in model.parameters())
    tokens = int(sum(s * s for s in cfg.scales))
    rows = []
    with torch.inference_mode(), tf32(False):
        gap = _logit_gap(model, space, text)
        for schedule_name in schedules:
            schedule = get_schedule(schedule_name)
            with FlopCounterMode(display=False) as counter:  # also the warm-up
                _timed(model, space, text, negative, schedule, True)
            flop = counter.get_total_flops()
            ours, baseline = float("inf"), float("inf")
            reset_peak(device)
            for _ in range(repeats):  # interleaved, the fastest of each: a shared machine is noisy
                seconds, a = _timed(model, space, text, negative, schedule, True)
                ours = min(ours, seconds)
                peak = peak_total(device)
                seconds, b = _timed(model, space, text, negative, schedule, False)
                baseline = min(baseline, seconds)
            tflops = flop / ours / 1e12
            rows.append({"config": name, "schedule": schedule_name, "batch": batch, "layers": cfg.num_layers,
                         "hidden": cfg.hidden_size, "parameters": params, "tokens": tokens, "device": str(device),
                         "dtype": dtype, "ours_s": round(ours, 4), "recompute_all_s": round(baseline, 4),
                         "speedup": round(baseline / ours, 2), "tokens_per_s": batch * tokens / ours,
                         "recompute_tokens_per_s": batch * tokens / baseline, "peak_mb": peak / 2**20,
                         "tflop_per_run": flop / 1e12, "tflops": tflops,
                         "share_of_ceiling": tflops * 1e3 / ceiling_of(ceiling, dtype),
                         "same_codes": bool(torch.equal(a, b)),
                         "codes_agree": round(float((a == b).float().mean()), 4), "logit_gap": gap})
            r = rows[-1]
            print(f"{name:<14}{schedule_name:<12}{batch:>4}{cfg.num_layers:>4}{ours:>9.3f}{baseline:>12.3f}"
                  f"{r['speedup']:>8.2f}x{r['tokens_per_s']:>10.0f}{tflops:>8.2f}{100 * r['share_of_ceiling']:>6.1f}%"
                  f"{r['peak_mb']:>9.0f}  {r['same_codes']!s:<6}{r['codes_agree']:>7.4f}{gap:>10.1e}", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,tiny-official,7b-shaped")
    parser.add_argument("--schedules", default="one-pass,two-pass,three-pass")
    parser.add_argument("--big-schedules", default="one-pass,two-pass", help="schedules of the 7b-shaped config")
    parser.add_argument("--batch", default="4", help="batch (comma list: a sweep)")
    parser.add_argument("--big-batch", default="1", help="batch of the 7b-shaped config (comma list: a sweep)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (the fastest is reported)")
    parser.add_argument("--big-repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32 (TF32 off on CUDA) or bf16")
    parser.add_argument("--ceiling-size", type=int, default=0, help="GEMM size of the ceiling (0: per device)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sampler_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ceiling = measure_ceiling(size=args.ceiling_size, device=device)
    print(f"{device_name(device)}, {args.dtype}; ceiling " + ", ".join(
        f"{k} {v:.0f}" for k, v in ceiling.items() if k.startswith("ceiling")) + " GFLOP/s")
    print(f"{'config':<14}{'schedule':<12}{'B':>4}{'L':>4}{'ours s':>9}{'recompute s':>12}{'speedup':>9}"
          f"{'tok/s':>10}{'TFLOP/s':>8}{'ceil%':>7}{'peak MB':>9}  same  agree  logit gap")
    rows = []
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "device": device_name(device), "cfg": 7.5, "dtype": args.dtype, "load_average": os.getloadavg(),
            "repeats": args.repeats, "ceiling_gflops": ceiling}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        big = name == "7b-shaped"
        for batch in (args.big_batch if big else args.batch).split(","):
            rows += bench(name, args.layers, int(batch), (args.big_schedules if big else args.schedules).split(","),
                          args.big_repeats if big else args.repeats, device, args.dtype, ceiling)
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))  # kept if killed later
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
