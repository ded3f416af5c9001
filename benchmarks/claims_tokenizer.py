"""The `codebooks` section of benchmarks/claims.py: does the shared index use the codebook better
than one half's distance alone (TokenFlow §3.2, Table 5), and does usage hold as K grows (§4.4)?

Tokenizers are trained with the `shapes-toy` recipe under three index rules at the recipe's K,
then `tokenflow eval usage` (held-out shapes + natural crops) and `tokenflow eval rfid`
(per-domain PSNR) measure them. A second set trains shared and pixel-only at larger K and
measures usage only. Each figure is the mean over seeds; its interval is the [min, max] over
those seeds (a range, not a confidence level).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_ablation import last_step

# index rule -> its `--set` overrides on the shapes-toy recipe
RULES: dict[str, tuple[str, ...]] = {
    "shared": (),  # argmin d_sem + w_dis * d_pix with w_dis = 1 (the recipe's default)
    "pixel-only": ("model.quantizer.use_semantic=false",),  # semantic half off: argmin d_pix
    # w_dis = 0 makes the search argmin d_sem exactly (quantizer.nearest_code); the pixel codebook
    # is still trained and decoded, looked up by that index
    "semantic-only": ("model.quantizer.pixel_weight=0",),
}
SWEEP_RULES = ("shared", "pixel-only")
RULES_ORDER = {rule: i for i, rule in enumerate(RULES)}

# (tokenflow arguments, is that sub-run's output already there) -> the exact command line
Tokenflow = Callable[[list[str], bool], str]


@dataclass
class CodebookSettings:
    data: Path  # the lead's data folder (shapes-test, natural-val, train.txt, val.txt)
    out: Path  # OUT/codebooks
    steps: int  # optimizer steps per tokenizer
    seeds: int  # tokenizers per setting (seeds 0..seeds-1)
    sweep: tuple[int, ...]  # codebook sizes of the usage-vs-K runs
    eval_images: int  # held-out images per domain (0 = all)
    teacher: str  # model.teacher.pretrained and model.semantic_encoder.pretrained ("" = the recipe's)


def seed_range(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of one figure over seeds."""
    return sum(values) / len(values), min(values), max(values)


def format_range(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """`mean [min, max]` over seeds; one seed has no interval."""
    if not values:
        return "-"
    mean, lo, hi = (scale * v for v in seed_range(values))
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def trained(run_dir: Path, steps: int) -> bool:
    """The run folder's log reached `steps` (else its training command resumes it)."""
    return (run_dir / "metrics.jsonl").is_file() and last_step(run_dir) >= steps


def fresh(report: Path, run_dir: Path) -> bool:
    """An output newer than the run it measured (a resumed training makes it stale)."""
    marks = [p.stat().st_mtime for p in (run_dir / "model.safetensors", run_dir / "metrics.jsonl") if p.is_file()]
    return report.is_file() and bool(marks) and report.stat().st_mtime >= max(marks)


def held_out_lists(s: CodebookSettings) -> dict[str, Path]:
    """Eval list files: shapes-test images and the natural-val crops val.txt does not use (val.txt
    picks checkpoints), each cut to `eval_images`, and both together for usage."""
    val = set((s.data / "val.txt").read_text().split()) if (s.data / "val.txt").is_file() else set()
    domains = {
        "shapes": sorted((s.data / "shapes-test" / "images").glob("*.png")),
        "natural": [p for p in sorted((s.data / "natural-val" / "images").glob("*.png")) if str(p) not in val],
    }
    s.out.mkdir(parents=True, exist_ok=True)
    lists = {}
    for name, paths in domains.items():
        paths = paths[: s.eval_images] if s.eval_images else paths
        if paths:
            lists[name] = s.out / f"eval-{name}.txt"
            lists[name].write_text("".join(f"{p.resolve()}\n" for p in paths))
    if not lists:
        raise FileNotFoundError(f"no held-out images under {s.data}/shapes-test or {s.data}/natural-val")
    lists["all"] = s.out / "eval-all.txt"
    lists["all"].write_text("".join(lists[n].read_text() for n in domains if n in lists))
    return lists


def train_args(s: CodebookSettings, rule: str, k: int | None, seed: int, run_dir: Path) -> list[str]:
    args = ["train-tokenizer", "shapes-toy", "-o", str(run_dir), "--steps", str(s.steps), "--seed", str(seed)]
    sets = [f"data.train={s.data / 'train.txt'}", f"data.val={s.data / 'val.txt'}", *RULES[rule]]
    if s.teacher and rule != "pixel-only":
        sets += [f"model.teacher.pretrained={s.teacher}", f"model.semantic_encoder.pretrained={s.teacher}"]
    if k is not None:
        sets.append(f"model.quantizer.codebook_size={k}")
    return args + [x for kv in sets for x in ("--set", kv)]


def one_run(s: CodebookSettings, lists: dict[str, Path], rule: str, k: int | None, seed: int,
            tokenflow: Tokenflow) -> dict:
    """Train one tokenizer (or resume it), then its usage and, at the recipe's K, per-domain PSNR."""
    name = f"{rule}-K{k or 'recipe'}-seed{seed}"
    run_dir, eval_dir = s.out / name, s.out / "eval" / f"{name}-images{s.eval_images or 'all'}"
    commands = [tokenflow(train_args(s, rule, k, seed, run_dir), trained(run_dir, s.steps))]
    usage_dir = eval_dir / "usage"
    commands.append(tokenflow(["eval", "usage", "--model", str(run_dir), "--data", str(lists["all"]),
                               "-o", str(usage_dir)], fresh(usage_dir / "report.json", run_dir)))
    usage = json.loads((usage_dir / "report.json").read_text())
    shared = usage["views"]["shared"]
    row = {"rule": rule, "seed": seed, "run": str(run_dir), "codebook_size": usage["codebook_size"],
           "steps": last_step(run_dir), "images": usage["images"], "tokens": shared["overall"]["tokens"],
           "usage": shared["overall"]["usage"], "used": shared["overall"]["used"],
           "perplexity": shared["overall"]["perplexity"], "final_scale_usage": shared["per_scale"][-1]["usage"],
           "agreement_with_shared": usage["agreement_with_shared"], "psnr": {}, "commands": commands}
    if k is None:
        for domain in ("shapes", "natural"):
            if domain not in lists:
                continue
            rfid_dir = eval_dir / f"rfid-{domain}"
            args = ["eval", "rfid", "--model", str(run_dir), "--data", str(lists[domain]), "-o", str(rfid_dir),
                    "--tiny-features", "--no-kid", "--no-lpips"]
            commands.append(tokenflow(args, fresh(rfid_dir / "report.json", run_dir)))
            row["psnr"][domain] = json.loads((rfid_dir / "report.json").read_text())["results"]["data"]["psnr"]
    return row


def run_codebooks(s: CodebookSettings, tokenflow: Tokenflow) -> dict:
    """Every sub-run (a failed one is recorded and the others go on), then the section's tables."""
    lists = held_out_lists(s)
    plan = [(rule, None, seed) for rule in RULES for seed in range(s.seeds)]
    plan += [(rule, k, seed) for k in s.sweep for rule in SWEEP_RULES for seed in range(s.seeds)]
    runs, errors = [], []
    for rule, k, seed in plan:
        try:
            runs.append({**one_run(s, lists, rule, k, seed, tokenflow), "sweep": k is not None})
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            errors.append(f"{rule} K={k or 'recipe'} seed {seed}: {err}")
    eval_sets = {n: len(p.read_text().split()) for n, p in lists.items()}
    return {"status": "partial" if errors else "done", "runs": runs, "errors": errors, "eval_images": eval_sets,
            "tables": [rule_table(runs, s), sweep_table(runs)]}


def _group(runs: list[dict], key: Callable[[dict], tuple]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def rule_table(runs: list[dict], s: CodebookSettings) -> dict:
    rows = []
    for (rule,), group in _group([r for r in runs if not r["sweep"]], lambda r: (r["rule"],)).items():
        psnr = {d: [r["psnr"][d] for r in group if d in r["psnr"]] for d in ("shapes", "natural")}
        cells = [rule, " ".join(RULES[rule]) or "(recipe default)", str(group[0]["codebook_size"]), str(len(group)),
                 format_range([r["usage"] for r in group], 100), format_range([r["perplexity"] for r in group], 1, 0),
                 format_range([r["final_scale_usage"] for r in group], 100),
                 format_range(psnr["shapes"], 1, 2), format_range(psnr["natural"], 1, 2)]
        rows.append({"cells": cells, "commands": [c for r in group for c in r["commands"]]})
    return {
        "title": f"Index rule at equal K (shapes-toy, {s.steps} steps)",
        "columns": ["index rule", "switch", "K", "seeds", "usage % (all scales)", "perplexity",
                    "usage % (final scale)", "PSNR shapes dB", "PSNR natural dB"],
        "rows": rows,
        "notes": ["usage/perplexity: `eval usage`, shared index, over the held-out shapes + natural images; "
                  "PSNR: `eval rfid` on each domain.",
                  "semantic-only is exact: `pixel_weight=0` makes the index argmin d_sem; the pixel codebook is "
                  "still trained and decoded by that index. pixel-only turns the semantic half off entirely.",
                  f"teacher: {s.teacher or 'the recipe default'} (pixel-only has none).",
                  "figure = mean over seeds; [min, max] over those seeds (a range, not a confidence level)."],
    }


def sweep_table(runs: list[dict]) -> dict:
    rows = []
    groups = _group(runs, lambda r: (r["codebook_size"], r["rule"]))
    for (k, rule), group in sorted(groups.items(), key=lambda kv: (kv[0][0], RULES_ORDER.get(kv[0][1], 9))):
        if rule not in SWEEP_RULES:
            continue
        ceiling = min(1.0, group[0]["tokens"] / k)
        cells = [str(k), rule, str(len(group)), format_range([r["usage"] for r in group], 100),
                 format_range([r["used"] for r in group], 1, 0), format_range([r["perplexity"] for r in group], 1, 0),
                 f"{group[0]['tokens']} ({100 * ceiling:.0f}%)"]
        rows.append({"cells": cells, "commands": [c for r in group for c in r["commands"]]})
    return {
        "title": "Codebook usage as K grows",
        "columns": ["K", "index rule", "seeds", "usage %", "codes used", "perplexity", "eval tokens (usage ceiling)"],
        "rows": rows,
        "notes": ["the recipe's K comes from the equal-K runs above; usage can be at most eval tokens / K.",
                  "figure = mean over seeds; [min, max] over those seeds (a range, not a confidence level)."],
    }
