"""The TokenFlow paper's claims measured on our toy shapes world, in one report.

Sections (each runs the real `tokenflow` commands; every sub-run is skipped when its output is
there and trainings resume from their run folders, so a rerun continues):

- codebooks: shared vs pixel-only vs semantic-only index at equal K (usage, PSNR), and usage as
  K grows (benchmarks/claims_tokenizer.py);
- understanding: VQA accuracy per question type for the four feature choices (tokenflow, pixel,
  semantic, teacher) and the three scale choices (final, all, residual) on `--tokenizer`, and a
  single-scale tokenizer (`--single-tokenizer`), each on the `llava-toy` recipe
  (benchmarks/claims_understanding.py);
- generation: GenEval one/two/three passes, trained refine vs official in-place
  (benchmarks/multistep_geneval.py's runs) on `--generator`.

Writes the Markdown block into `--report` (between markers; the rest of the file is kept) and
every figure into `--json`; a section not run this time keeps its last figures.

    python benchmarks/claims.py --data data/toy --tokenizer runs/tok --generator runs/gen -o runs/claims
    python benchmarks/claims.py --data /tmp/cl -o /tmp/cl/out --quick --only codebooks --report /tmp/cl/R.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from claims_stats import bootstrap_ci, format_ci
from claims_tokenizer import CodebookSettings, run_codebooks
from claims_understanding import run_understanding
from llava_ablation import run

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("codebooks", "understanding", "generation")
BEGIN, END = "<!-- benchmarks/claims.py: begin -->", "<!-- benchmarks/claims.py: end -->"
# option -> (full run, --quick); an option given on the command line wins over both
DEFAULTS = {"steps": (1500, 30), "seeds": (2, 1), "k_sweep": ("1024,4096,16384", "1024,4096"),
            "eval_images": (0, 16), "stage1_steps": (300, 3), "stage2_steps": (1500, 3), "llava_batch_size": (0, 4),
            "vqa_limit": (0, 64), "n_per_tag": (10, 2), "samples": (4, 1)}


@dataclass
class Runner:
    """Runs one `tokenflow` command (llava_ablation.run: output to the log, RuntimeError on
    failure) unless its output is there; returns the exact command line either way."""

    env: dict[str, str]
    log: Path
    device: str
    places: dict[str, str]  # absolute folder -> the placeholder the documented command shows

    def __call__(self, args: list[str], done: bool) -> str:
        args = [*args, "--device", self.device]
        line = "tokenflow " + shlex.join(args)
        print(f"[{'have' if done else 'run '}] {line}", flush=True)
        if not done:
            run(args, self.env, self.log)
        return portable(line, self.places)


def portable(line: str, places: dict[str, str]) -> str:
    """`line` with this machine's folders replaced by placeholders (DATA, OUT), for the docs."""
    for folder, name in sorted(places.items(), key=lambda kv: -len(kv[0])):  # longest (nested) first
        line = line.replace(folder, name)
    return line


def doc_places(a: argparse.Namespace) -> dict[str, str]:
    """Folders the documented commands name by placeholder; files inside the repository (the shipped
    tokenizer, say) by their path from its root."""
    return {str(a.data.resolve()): "DATA", str(a.output.resolve()): "OUT", f"{REPO}/": ""}


# ---- generation ---------------------------------------------------------------------------------


def run_generation(a: argparse.Namespace) -> dict:
    """multistep_geneval.py's runs, in this process, keeping each image's record for the CI."""
    from multistep_geneval import RUNS

    out, loaded, rows, errors = a.output / "generation", None, [], []
    settings = {"n_per_tag": a.n_per_tag, "samples": a.samples, "cfg": a.cfg, "generator": str(a.generator)}
    for schedule, mode in RUNS:
        folder = out / f"{schedule}-{mode}"
        done = (folder / "claims-settings.json").is_file() and (folder / "records.jsonl").is_file() and json.loads(
            (folder / "claims-settings.json").read_text()) == settings
        print(f"[{'have' if done else 'run '}] geneval {schedule} / {mode}", flush=True)
        if not done:
            loaded = loaded or _load_generator(a)
            try:
                _geneval(loaded, schedule, mode, a, folder)
            except ValueError as err:  # e.g. refine on a model trained without the refine block
                errors.append(f"{schedule}/{mode}: {err}")
                continue
            (folder / "claims-settings.json").write_text(json.dumps(settings))
        records = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines() if x.strip()]
        rows.append({"schedule": schedule, "multi_step": mode, "records": records})
    return {"status": "partial" if errors else "done", "errors": errors,
            "tables": [geneval_table(rows, a)], "overall": {f"{r['schedule']}/{r['multi_step']}":
                                                            geneval_ci(r["records"], a.samples, a.resamples)[0]
                                                            for r in rows}}


def _load_generator(a: argparse.Namespace):
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.generation.text_to_image import resolve_generator

    return resolve_generator(str(a.generator), resolve_device(a.device))


def _geneval(loaded, schedule: str, mode: str, a: argparse.Namespace, folder: Path) -> None:
    import torch

    from tokenflow_cli.generation.geneval import run_geneval
    from tokenflow_cli.generation.multistep import MULTI_STEP
    from tokenflow_cli.generation.sampling import get_schedule
    from tokenflow_cli.generation.text_to_image import GenerationSettings

    loaded.model.multi_step = MULTI_STEP[mode]
    settings = GenerationSettings(get_schedule(schedule), cfg=a.cfg, seed=0, samples_per_prompt=a.samples)
    with torch.no_grad():
        report = run_geneval(loaded, settings, folder, n_per_tag=a.n_per_tag)
    (folder / "report.json").write_text(json.dumps(report, indent=2))


def geneval_ci(records: list[dict], samples: int, resamples: int) -> tuple[float, float, float]:
    """Overall GenEval (mean over tags) with a bootstrap CI over prompts (each prompt's samples
    are consecutive records and stay together)."""
    prompts = [records[i : i + samples] for i in range(0, len(records), samples)]
    scores = [sum(bool(r["correct"]) for r in p) / len(p) for p in prompts]
    return bootstrap_ci(scores, groups=[p[0]["tag"] for p in prompts], resamples=resamples)


def geneval_table(rows: list[dict], a: argparse.Namespace) -> dict:
    command = section_command(a, "generation")
    table_rows = []
    for r in rows:
        tags: dict[str, list[bool]] = {}
        for rec in r["records"]:
            tags.setdefault(rec["tag"], []).append(bool(rec["correct"]))
        per_tag = ", ".join(f"{t} {100 * sum(v) / len(v):.0f}" for t, v in sorted(tags.items()))
        table_rows.append({"cells": [r["schedule"], r["multi_step"], str(len(r["records"]) // a.samples),
                                     format_ci(geneval_ci(r["records"], a.samples, a.resamples)), per_tag],
                           "commands": [command]})
    return {"title": f"GenEval-lite on the shapes world (generator {a.generator})",
            "columns": ["schedule", "multi-step", "prompts", "overall % [95% CI]", "per tag %"], "rows": table_rows,
            "notes": [f"{a.samples} images per prompt, cfg {a.cfg}, sampling seed 0, {a.n_per_tag} prompts per tag; "
                      f"the runs and settings of `python benchmarks/multistep_geneval.py --model {a.generator} "
                      f"--n-per-tag {a.n_per_tag} --samples {a.samples}`.",
                      f"[95% CI]: percentile bootstrap over prompts, {a.resamples} resamples; overall = mean over "
                      "tags.", "refine = our trained refine block; inplace = the official untrained re-run."]}


# ---- report -------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [x.split(":", 1)[1].strip() for x in cpuinfo.read_text().splitlines() if x.startswith("model name")]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": str(cores), "threads": os.environ.get("OMP_NUM_THREADS", "unset (all cores)"),
            "python": platform.python_version()}


def render_markdown(result: dict) -> str:
    """The report block: a header (machine, date), then each section's tables, or `not run` and
    the command that would run it."""
    m = result["machine"]
    lines = ["## TokenFlow's claims at toy scale (`benchmarks/claims.py`)", "",
             f"Last run {result['date']} on {m['cpu']} ({m['cores']} cores, OMP_NUM_THREADS={m['threads']}, "
             f"device {result['device']}). Figures for toy models on 32 px shapes: they compare the choices, "
             "they are not paper numbers.", ""]
    for name in SECTIONS:
        section = result["sections"].get(name) or {"status": "not run", "command": result["commands"][name]}
        lines += [f"### {name}", ""]
        if section["status"] == "not run":
            reason = f" ({section['reason']})" if section.get("reason") else ""
            lines += [f"not run{reason}; to run it:", "", f"    {section['command']}", ""]
            continue
        lines += [f"Measured {section['date']} on {section['machine']}, by `{section['command']}`.", ""]
        lines += [f"- failed: {e}" for e in section.get("errors", [])] + ([""] if section.get("errors") else [])
        for table in section["tables"]:
            lines += render_table(table)
    return "\n".join(lines).rstrip("\n") + "\n"


def render_table(table: dict) -> list[str]:
    numbered = [r for r in table["rows"] if r["commands"]]
    lines = [f"**{table['title']}**", "", "| " + " | ".join([*table["columns"], "cmd"]) + " |",
             "|---" * (len(table["columns"]) + 1) + "|"]
    for row in table["rows"]:
        ref = f"c{numbered.index(row) + 1}" if row["commands"] else "-"
        lines.append("| " + " | ".join([*(c.replace("|", "\\|") for c in row["cells"]), ref]) + " |")
    lines += [""] + [f"- {n}" for n in table.get("notes", [])] + ([""] if table.get("notes") else [])
    if numbered:
        lines += ["<details><summary>commands</summary>", "", "```"]
        for i, row in enumerate(numbered, 1):
            lines += [f"# c{i}", *row["commands"]]
        lines += ["```", "", "</details>", ""]
    return lines


def splice(existing: str, block: str) -> str:
    """The file with its claims block replaced (or appended when it has none)."""
    wrapped = f"{BEGIN}\n{block}{END}\n"
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        return head + wrapped + rest.split(END, 1)[1].lstrip("\n")
    return f"{existing.rstrip()}\n\n{wrapped}" if existing.strip() else wrapped


def section_command(a: argparse.Namespace, name: str) -> str:
    args = ["python", "benchmarks/claims.py", "--data", "DATA", "-o", "OUT", "--only", name]
    args += ["--quick"] if a.quick else []
    options = {"codebooks": ["steps", "seeds", "k_sweep", "eval_images", "teacher"],
               "understanding": ["tokenizer", "single_tokenizer", "stage1_steps", "stage2_steps", "llava_batch_size",
                                 "max_length", "vqa_limit"],
               "generation": ["generator", "n_per_tag", "samples", "cfg"]}[name]
    for key in options:  # a model not given shows a placeholder to fill in
        value = getattr(a, key)
        if key == "single_tokenizer" and value is None:
            continue  # optional: its row says `not run`
        args += [f"--{key.replace('_', '-')}", str(value if value is not None else key.upper() + "_RUN")]
    return portable(shlex.join(args + (["--device", a.device] if a.device != "auto" else [])), doc_places(a))


def missing_inputs(a: argparse.Namespace, name: str) -> str:
    need = {"codebooks": [a.data / "train.txt", a.data / "val.txt", a.data / "shapes-test" / "images"],
            "understanding": [a.data / "shapes" / "llava.json", a.data / "shapes-val" / "llava.json",
                              a.data / "shapes-test" / "vqa.jsonl"], "generation": []}[name]
    given = {"understanding": ("--tokenizer", a.tokenizer), "generation": ("--generator", a.generator)}.get(name)
    if given and (given[1] is None or not Path(given[1]).exists()):
        return f"no {given[0]} given" if given[1] is None else f"{given[1]} does not exist"
    absent = [str(p) for p in need if not p.exists()]
    return f"missing {', '.join(absent)}" if absent else ""


def run_section(a: argparse.Namespace, name: str, tokenflow: Runner) -> dict:
    if name == "codebooks":
        settings = CodebookSettings(a.data, a.output / "codebooks", a.steps, a.seeds,
                                    tuple(int(k) for k in a.k_sweep.split(",") if k), a.eval_images, a.teacher)
        return run_codebooks(settings, tokenflow)
    return run_understanding(a, tokenflow) if name == "understanding" else run_generation(a)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with shapes*, natural*, train.txt, val.txt")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/claims"), help="work folder (resumable)")
    p.add_argument("--tokenizer", type=Path, help="trained tokenizer run folder (understanding)")
    p.add_argument("--generator", type=Path, help="trained generator run folder (generation)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the figures")
    p.add_argument("--report", type=Path, default=Path("docs/RESULTS.md"))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/claims.json"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, help="tokenizer steps per codebooks run (1500; quick 30)")
    p.add_argument("--seeds", type=int, help="tokenizers per codebooks setting (2; quick 1)")
    p.add_argument("--k-sweep", help="codebook sizes of the usage-vs-K runs (1024,4096,16384; quick 1024,4096)")
    p.add_argument("--eval-images", type=int, help="held-out images per domain, 0 = all (quick 16)")
    p.add_argument("--teacher", default="teacher-tiny", help="teacher and semantic-tower init ('' = the recipe's)")
    p.add_argument("--stage1-steps", type=int, help="LLaVA stage 1 steps (300; quick 3)")
    p.add_argument("--stage2-steps", type=int, help="LLaVA stage 2 steps (1500; quick 3)")
    p.add_argument("--llava-batch-size", type=int, help="0 = the recipe's (quick 4)")
    p.add_argument("--max-length", type=int, default=256, help="LLaVA tokens per sample: covers 130 visual "
                   "tokens (all / residual) + the question and answer")
    p.add_argument("--single-tokenizer", type=Path, help="trained single-scale tokenizer (understanding)")
    p.add_argument("--variants", default="", help="understanding rows to run now (comma-separated; default all)")
    p.add_argument("--vqa-limit", type=int, help="first N test questions, 0 = all (quick 64)")
    p.add_argument("--n-per-tag", type=int, help="GenEval prompts per tag (10; quick 2)")
    p.add_argument("--samples", type=int, help="GenEval images per prompt (4; quick 1)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    a = p.parse_args(argv)
    for key, (full, quick) in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    a.data, a.output = a.data.resolve(), a.output.resolve()
    a.tokenizer, a.generator, a.single_tokenizer = (x.resolve() if x else None
                                                    for x in (a.tokenizer, a.generator, a.single_tokenizer))
    unknown = set(a.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    a.output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tokenflow = Runner(env, a.output / "log.txt", a.device, doc_places(a))
    previous = json.loads(a.json.read_text()) if a.json.is_file() else {}
    now, host = datetime.date.today().isoformat(), machine()
    result = {"date": now, "machine": host, "device": a.device, "sections": previous.get("sections", {}),
              "commands": {n: section_command(a, n) for n in SECTIONS}}
    for name in a.only.split(","):
        stamp = {"date": now, "machine": f"{host['cpu']}, {host['threads']} threads",
                 "command": section_command(a, name)}
        reason = missing_inputs(a, name)
        if reason:
            result["sections"][name] = {**stamp, "status": "not run", "reason": reason}
            print(f"{name}: not run ({reason})", file=sys.stderr)
            continue
        result["sections"][name] = {**stamp, **run_section(a, name, tokenflow)}
    for name in SECTIONS:  # a section not run keeps no stale command: it shows today's
        if result["sections"].get(name, {}).get("status", "not run") == "not run" and name not in a.only.split(","):
            result["sections"][name] = {"status": "not run", "command": result["commands"][name]}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2, default=str))
    block = render_markdown(result)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(splice(a.report.read_text() if a.report.is_file() else "", block))
    print(block)
    print(f"wrote {a.report} and {a.json}")


if __name__ == "__main__":
    main()
