"""Next-scale sampling speed: our KV cache against recomputing the whole sequence at every step
(the official sampler), same model, same seed, same codes.

Configs: `tiny` (tokenflow_cli/recipes/generator-tiny.yaml over the tiny tokenizer's 7 scales, 521 tokens)
and `mid` (a 12-layer, 768-wide Llama over the clipb-256 scales, 817 tokens, K = 32768). The
code space comes from a randomly initialised quantizer of that recipe: speed does not depend on
the weights. Reports codes/s (image tokens generated per second, refine passes not counted) and
images/s for each schedule, with CFG (doubled batch), checks that both paths give the same
codes, and the largest gap between the cached step-by-step logits and one full pass. Decoding
codes to pixels is not included (it is the same for both).

    python benchmarks/generate.py [--device cpu|cuda] [--configs tiny,mid] [--batch 4]
                                  [--schedules one-pass,two-pass] [--dtype fp32|bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from tokenflow_cli.config import load_recipe
from tokenflow_cli.generation.config import GeneratorModelConfig, GeneratorRecipe, attach_code_space
from tokenflow_cli.generation.model import TextBatch, build_generator
from tokenflow_cli.generation.sampling import get_schedule
from tokenflow_cli.tokenizer.config import QuantizerConfig, TokenizerRecipe
from tokenflow_cli.tokenizer.quantizer import MultiScaleDualQuantizer


class QuantizerEmbedder:
    """The code embedder interface over a bare (random) quantizer."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        self.quantizer = MultiScaleDualQuantizer(cfg).eval()
        self.scales, self.codebook_size = tuple(cfg.scales), cfg.codebook_size
        self.code_dim = cfg.semantic_dim + cfg.pixel_dim

    def to(self, device: torch.device) -> QuantizerEmbedder:
        self.quantizer.to(device)
        return self

    def lookup_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(idx_Bl)

    def next_scale_inputs(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        return self.quantizer.next_scale_inputs(idx_BL, self.scales[-1])


def configs() -> dict[str, tuple[GeneratorModelConfig, QuantizerConfig]]:
    tiny_q = load_recipe("tiny", TokenizerRecipe).model.quantizer
    tiny = attach_code_space(load_recipe("generator-tiny", GeneratorRecipe).model, tiny_q.scales,
                             tiny_q.codebook_size, tiny_q.semantic_dim + tiny_q.pixel_dim)
    mid_q = load_recipe("clipb-256", TokenizerRecipe).model.quantizer
    mid = GeneratorModelConfig(name="mid", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                               intermediate_size=2048, text_vocab_size=1024, max_text_tokens=32,
                               scales=mid_q.scales, codebook_size=mid_q.codebook_size, code_dim=40)
    return {"tiny": (tiny, tiny_q), "mid": (mid, mid_q)}


def run_one(model, embedder, text, negative, schedule, use_cache: bool, seed: int, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    codes = model.generate(embedder, text, negative, schedule, cfg=3.0,
                           generator=torch.Generator(device=device).manual_seed(seed), use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, codes


def cache_logit_error(model, embedder, text, device) -> float:
    """max |stepwise logits with the KV cache - one full teacher-forced pass| on random codes."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, embedder.codebook_size, (text.ids_BT.shape[0], model.num_image_tokens), generator=g)
    inputs = embedder.next_scale_inputs(codes.to(device))
    with torch.no_grad():
        full = model(text, inputs).logits_BLK.float()
    return float((model.stepwise_logits(text, inputs, use_cache=True).float() - full).abs().max())


def bench(name: str, batch: int, schedules: list[str], device: torch.device, repeats: int,
          dtype: torch.dtype = torch.float32) -> list[dict]:
    model_cfg, q_cfg = configs()[name]
    torch.manual_seed(0)
    model = build_generator(dataclasses.replace(model_cfg, init_std=0.02)).to(device=device, dtype=dtype).eval()
    embedder = QuantizerEmbedder(q_cfg).to(device)
    g = torch.Generator().manual_seed(0)
    T = min(16, model_cfg.max_text_tokens)
    text = TextBatch(torch.randint(4, model_cfg.text_vocab_size, (batch, T), generator=g).to(device),
                     torch.ones(batch, T, dtype=torch.long, device=device))
    negative = TextBatch(text.ids_BT[:, :1].clone(), text.mask_BT[:, :1].clone())
    L = model.num_image_tokens
    logit_error = cache_logit_error(model, embedder, text, device)
    rows = []
    run_one(model, embedder, text, negative, get_schedule("one-pass"), True, 0, device)  # warm-up
    for sched_name in schedules:
        schedule = get_schedule(sched_name)
        timings = {}
        codes = {}
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(repeats):
                seconds, codes[use_cache] = run_one(model, embedder, text, negative, schedule, use_cache, 1, device)
                best = min(best, seconds)
            timings[use_cache] = best
        row = {"config": name, "schedule": sched_name, "batch": batch, "tokens_per_image": L,
               "dtype": str(dtype).replace("torch.", ""), "cache_logit_max_err": logit_error,
               "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               "same_codes": bool(torch.equal(codes[True], codes[False]))}
        for use_cache, label in ((True, "cache"), (False, "recompute")):
            row[f"{label}_s"] = round(timings[use_cache], 3)
            row[f"{label}_codes_per_s"] = round(batch * L / timings[use_cache], 1)
            row[f"{label}_images_per_s"] = round(batch / timings[use_cache], 3)
        row["speedup"] = round(timings[False] / timings[True], 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--schedules", default="one-pass,two-pass")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for name in args.configs.split(","):
        rows += bench(name, args.batch, args.schedules.split(","), device, args.repeats, dtype)
    header = ["config", "schedule", "dtype", "batch", "tokens_per_image", "params_M", "cache_s", "recompute_s",
              "speedup", "cache_codes_per_s", "recompute_codes_per_s", "cache_images_per_s",
              "recompute_images_per_s", "same_codes", "cache_logit_max_err"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
