"""benchmarks/claims.py's understanding section: the paper's understanding ablations at toy scale.

Every variant trains the same `llava-toy` recipe (stage 1, stage 2 from stage 1) with the same
data, steps, batch and seed, and answers the same held-out questions with `eval vqa`; only the
visual tokens differ:

- feature choice (paper Table 4): the tokenizer's `tokenflow` map vs its `pixel` or `semantic`
  channels alone vs the frozen `teacher` features, all at the final scale;
- scale choice (the paper's finding that understanding needs only the final scale): `final`
  (the summed final map) vs `all` (every scale's running-sum map as its own tokens) vs
  `residual` (every scale's own codes), and a single-scale tokenizer's one map
  (`--single-tokenizer`, e.g. recipes/shapes-toy-single.yaml trained like the multi-scale one).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from claims_stats import bootstrap_ci, format_ci
from claims_tokenizer import fresh, trained

# visual tokens per variant with the toy tokenizers (32 px, final grid 8 x 8, scales 1,2,3,4,6,8)
TOKENS = {"tokenflow": 64, "pixel": 64, "semantic": 64, "teacher": 64, "tokenflow-all": 130,
          "tokenflow-residual": 130, "single-scale": 64}


@dataclass(frozen=True)
class Variant:
    name: str  # run folder prefix and table label
    features: str  # model.features
    scales: str  # model.feature_scales
    single: bool = False  # on --single-tokenizer instead of --tokenizer

    @property
    def sets(self) -> list[str]:
        out = [f"model.features={self.features}"]
        return out + ([f"model.feature_scales={self.scales}"] if self.scales != "final" else [])


VARIANTS = (
    Variant("tokenflow", "tokenflow", "final"),
    Variant("pixel", "pixel", "final"),
    Variant("semantic", "semantic", "final"),
    Variant("teacher", "teacher", "final"),
    Variant("tokenflow-all", "tokenflow", "all"),
    Variant("tokenflow-residual", "tokenflow", "residual"),
    Variant("single-scale", "tokenflow", "final", single=True),
)
FEATURE_ROWS = ("tokenflow", "pixel", "semantic", "teacher")
SCALE_ROWS = {"tokenflow": "final: the summed final map", "tokenflow-all": "all: every scale's running sum",
              "tokenflow-residual": "residual: every scale's own codes",
              "single-scale": "single-scale tokenizer: its one map"}


def run_understanding(a: argparse.Namespace, tokenflow) -> dict:
    out = a.output / "understanding"
    common = [f"data.train={a.data / 'shapes' / 'llava.json'}", f"data.val={a.data / 'shapes-val' / 'llava.json'}",
              f"stage1.steps={a.stage1_steps}", f"train.steps={a.stage2_steps}", f"model.max_length={a.max_length}"]
    common += [f"train.batch_size={a.llava_batch_size}"] if a.llava_batch_size else []
    wanted = a.variants.split(",") if a.variants else [v.name for v in VARIANTS]
    reports, errors = {}, []
    for v in (v for v in VARIANTS if v.name in wanted):
        tokenizer = a.single_tokenizer if v.single else a.tokenizer
        if tokenizer is None:
            errors.append(f"{v.name}: not run (no --single-tokenizer given)")
            continue
        s1, s2, ev = out / f"{v.name}-stage1", out / f"{v.name}-stage2", out / f"{v.name}-eval{a.vqa_limit or ''}"
        sets = [x for kv in [f"model.tokenizer={tokenizer}", *v.sets, *common] for x in ("--set", kv)]
        try:
            commands = [
                tokenflow(["finetune-llava", "llava-toy", "--stage", "1", "-o", str(s1), *sets],
                          trained(s1, a.stage1_steps)),
                tokenflow(["finetune-llava", "llava-toy", "--stage", "2", "-o", str(s2), "--init", str(s1), *sets],
                          trained(s2, a.stage2_steps)),
                tokenflow(["eval", "vqa", "--data", str(a.data / "shapes-test" / "vqa.jsonl"), "--model", str(s2),
                           "-o", str(ev), "--limit", str(a.vqa_limit), "--batch-size", "128"],
                          fresh(ev / "predictions.jsonl", s2)),
            ]
        except RuntimeError as err:  # one failed variant keeps the others' figures
            errors.append(f"{v.name}: {err}")
            continue
        rows = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines() if x.strip()]
        reports[v.name] = {"questions": rows, "commands": commands,
                           "warnings": json.loads((ev / "report.json").read_text()).get("warnings", [])}
    cis = {name: vqa_cis(r["questions"], a.resamples) for name, r in reports.items()}
    return {"status": "partial" if errors else "done", "errors": errors,
            "tables": vqa_tables(reports, cis, a),
            "accuracy": {name: {kind: ci[0] for kind, ci in c.items()} for name, c in cis.items()}}


def vqa_cis(questions: list[dict], resamples: int) -> dict[str, tuple[float, float, float]]:
    """Exact-match accuracy with its bootstrap CI, overall ("all") and per question type."""
    from tokenflow_cli.understanding.vqa import normalize_answer

    correct = [float(normalize_answer(q["prediction"]) == normalize_answer(q["answer"])) for q in questions]
    out = {"all": bootstrap_ci(correct, resamples=resamples)}
    for kind in sorted({q["type"] for q in questions}):
        out[kind] = bootstrap_ci([c for c, q in zip(correct, questions) if q["type"] == kind], resamples=resamples)
    return out


def vqa_tables(reports: dict[str, dict], cis: dict[str, dict], a: argparse.Namespace) -> list[dict]:
    kinds = sorted({k for c in cis.values() for k in c if k != "all"})

    def row(name: str, label: str) -> dict:
        c = cis[name]
        return {"cells": [label, str(TOKENS[name]), str(len(reports[name]["questions"])),
                          *(format_ci(c[k]) if k in c else "-" for k in ("all", *kinds))],
                "commands": reports[name]["commands"]}

    ci_note = (f"exact match after `eval vqa`'s answer normalisation; [95% CI]: percentile bootstrap over "
               f"questions, {a.resamples} resamples; one training seed per row (the recipe's).")
    budget = (f"each row: llava-toy stage 1 {a.stage1_steps} steps + stage 2 {a.stage2_steps} steps at batch "
              f"{a.llava_batch_size or 'of the recipe (64)'}, on the CPU.")
    warnings = [f"warning: {w}" for w in sorted({w for r in reports.values() for w in r["warnings"]})]
    features = {"title": "VQA accuracy % by visual feature choice, final scale (held-out shapes-test)",
                "columns": ["features", "visual tokens", "questions", "all", *kinds],
                "rows": [row(n, n) for n in FEATURE_ROWS if n in cis],
                "notes": [ci_note, budget, *warnings]}
    scales = {"title": "VQA accuracy % by scale choice, tokenflow features (held-out shapes-test)",
              "columns": ["scales", "visual tokens", "questions", "all", *kinds],
              "rows": [row(n, label) for n, label in SCALE_ROWS.items() if n in cis],
              "notes": ["final = the official understanding input (sum of every scale's upsampled codes); all = "
                        "each scale's running sum, area-downsampled to that scale, as its own tokens coarse to "
                        "fine; residual = each scale's own code vectors (no running sum); definitions in "
                        "tokenflow_cli/understanding/features.py.",
                        "the single-scale tokenizer is recipes/shapes-toy-single.yaml, trained with the same "
                        "data, steps and teacher as the multi-scale one (`--single-tokenizer`).", budget]}
    return [features, scales]
