"""`tokenflow eval ...`: the eval group, and the evaluations of understanding (vqa), the teacher and
the generator (geneval); the tokenizer's (rfid, usage) and `prepare-fid` are in
eval_tokenizer_cmd.py. Each writes report.json into its output folder and prints a Rich table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import BatchOpt, DeviceOpt, OverwriteOpt, claim_output, console, err_console, fail
from tokenflow_cli.cli.models import (
    CfgOpt,
    GenBatchOpt,
    GenModelOpt,
    ImageTokenizerOpt,
    TemperatureOpt,
    load_generator_for_cli,
    open_count_bar,
)
from tokenflow_cli.cli.progress import count_progress

eval_app = typer.Typer(help="Evaluate tokenizers, generators and understanding models.", no_args_is_help=True)

LimitOpt = Annotated[int, typer.Option("--limit", help="At most N images (0 = all; built-in set: 64 + 64).")]


@eval_app.command("vqa")
def vqa_cmd(
    data: Annotated[Path, typer.Option("--data", help="Questions: shapes vqa.jsonl or LLaVA JSON/JSONL.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Understanding model or run folder.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json.")] = Path("vqa_eval"),
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Override the model's tokenizer.")] = None,
    image_root: Annotated[str, typer.Option("--image-root", help="Folder image paths are relative to.")] = "",
    yes_no: Annotated[bool, typer.Option("--yes-no", help="Only yes/no questions, scored like MME.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="First N questions (0 = all).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Questions per batch.")] = 32,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer.")] = 16,
    repetition_penalty: Annotated[float | None, typer.Option(
        "--repetition-penalty", min=1e-6,
        help="Override the model folder's generation_config.json value.")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="LLM: auto (the model's) | fp32 | bf16 | "
                                             "fp16 (the release as its own loader runs it, all float16).")] = "auto",
) -> None:
    """Exact match after normalisation, per question type, plus MME-style yes/no acc and acc+
    (greedy, with the model folder's repetition penalty, as the release's lmms-eval runs)."""
    from tokenflow_cli.cli.models import load_for_inference, precision_name, use_decoding
    from tokenflow_cli.fileio import atomic_write_text
    from tokenflow_cli.understanding.vqa import answer_questions, is_yes_no, load_vqa_items, score_vqa

    try:
        items = load_vqa_items(data, image_root)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    items = [i for i in items if is_yes_no(i)] if yes_no else items
    items = items[:limit] if limit else items
    if not items:
        raise fail(f"{data}: no questions{' with yes/no answers' if yes_no else ''}")
    claim = claim_output(output, "folder", "eval vqa", overwrite)
    loaded = load_for_inference(model, tokenizer, device, precision_name(dtype))
    use_decoding(loaded, repetition_penalty)
    console.print(f"decoding: {loaded.model.decoding.describe()}, max_new_tokens {max_new_tokens}", highlight=False)
    with count_progress(len(items), "vqa") as update:
        predictions = answer_questions(
            loaded.model, loaded.features, items, batch_size, max_new_tokens, progress=update
        )
    report = score_vqa(items, predictions)
    report.update(
        model=str(loaded.model_dir),
        tokenizer=loaded.tokenizer_source,
        data=str(data),
        features=loaded.model.config.features,
        feature_scales=loaded.model.config.feature_scales,
        dtype=loaded.dtype,
        max_new_tokens=max_new_tokens,
        **loaded.model.decoding.describe(),
        warnings=loaded.warnings,
    )
    claim.tmp.mkdir(parents=True, exist_ok=True)
    atomic_write_text(claim.tmp / "report.json", json.dumps(report, indent=2))
    rows = [
        json.dumps({"image": str(i.image), "question": i.question, "answer": i.answer, "type": i.type, "prediction": p})
        for i, p in zip(items, predictions, strict=True)
    ]
    atomic_write_text(claim.tmp / "predictions.jsonl", "\n".join(rows) + "\n")
    claim.commit()
    _print_report(report)
    console.print(f"wrote [bold]{output / 'report.json'}[/]")


def _print_report(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"VQA ({report['features']} features)")
    for column in ("type", "n", "accuracy"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for kind, row in report["per_type"].items():
        table.add_row(kind, str(row["n"]), f"{100 * row['accuracy']:.1f}")
    table.add_row("[bold]all", f"[bold]{report['n']}", f"[bold]{100 * report['accuracy']:.1f}")
    console.print(table)
    if "yes_no" in report:
        yn = report["yes_no"]
        console.print(
            f"yes/no (MME-style): acc {100 * yn['accuracy']:.1f}, acc+ {100 * yn['accuracy_plus']:.1f} "
            f"over {yn['images']} images, score {yn['mme_score']:.1f}, said yes {100 * yn['yes_ratio']:.0f}%"
        )


def write_report(report: dict, output: Path, claim=None) -> None:
    """OUTPUT/report.json; with a folder claim (`claim_output`), written into its temporary
    folder, which is then swapped in with everything else written there."""
    from tokenflow_cli.fileio import atomic_write_text

    folder = claim.tmp if claim is not None else output
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
    if claim is not None:
        claim.commit()
    for warning in report.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"wrote [bold]{output / 'report.json'}[/]")


def fmt_value(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@eval_app.command("teacher")
def teacher_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Teacher weights or run folder (default: the "
                                                                    "trained tiny teacher).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="captions.jsonl of a shapes world (default: built-in "
                                                           "held-out shapes).")] = None,
    model_name: Annotated[str, typer.Option("--model-name", help="open_clip architecture of --model when its file "
                                                                 "does not say.")] = "tokenflow-tiny-vit",
    limit: LimitOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json.")] = Path("eval_teacher"),
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Zero-shot accuracy of a CLIP teacher on shapes attributes (colour, shape, count)."""
    from rich.table import Table

    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.teacher.evaluate import default_eval_captions, load_clip, zero_shot_report
    from tokenflow_cli.weights import MissingWeightsError

    claim = claim_output(output, "folder", "eval teacher", overwrite)
    try:
        clip = load_clip(model, model_name)
    except (MissingWeightsError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(f"teacher: [cyan]{clip.source}[/]")
    captions = Path(data) if data else default_eval_captions(clip.image_size, limit or 0)
    report = zero_shot_report(clip, captions, resolve_device(device), batch_size, limit)
    console.print(f"data: {captions} ({report['images']} images)")
    table = Table(title="zero-shot accuracy (labels from the captions)")
    for column in ("attribute", "n", "classes", "accuracy", "balanced", "chance", "majority"):
        table.add_column(column, justify="left" if column == "attribute" else "right")
    for task, row in report["tasks"].items():
        table.add_row(task, str(row["n"]), str(len(row["classes"])), f"{row['accuracy']:.1%}",
                      f"{row['balanced_accuracy']:.1%}", f"{row['chance']:.1%}", f"{row['majority']:.1%}")
    console.print(table)
    write_report(report, output, claim)


@eval_app.command("geneval")
def geneval_cmd(
    model: GenModelOpt = None,
    tokenizer: ImageTokenizerOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json and images.")] = Path(
        "geneval_eval"),
    schedules: Annotated[str | None, typer.Option("--schedules", help="Comma-separated presets to compare "
                                                  "(or one k:p;k:p spec with ';' between passes); default: the "
                                                  "model's (one-pass for a converted official model).")] = None,
    per_tag: Annotated[int, typer.Option("--per-tag", help="Prompts per GenEval tag.")] = 20,
    samples: Annotated[int, typer.Option("--samples", help="Images per prompt (GenEval: 4).")] = 4,
    cfg: CfgOpt = None,
    temperature: TemperatureOpt = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    prompt_seed: Annotated[int, typer.Option("--prompt-seed", help="Seed of the prompt set.")] = 0,
    batch_size: GenBatchOpt = 16,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Shapes-world GenEval: per-tag and overall scores by the classical detector, plus the
    folder layout GenEval's own evaluator reads (OUT/<schedule>/geneval)."""
    from rich.table import Table

    from tokenflow_cli.fileio import atomic_write_text
    from tokenflow_cli.generation.geneval import detector_ceiling, run_geneval
    from tokenflow_cli.generation.sampling import get_schedule, sampler_defaults

    names = [s.strip().replace(";", ",") for s in (schedules or "").split(",") if s.strip()]
    try:
        plans = {name: get_schedule(name) for name in names}
    except ValueError as err:
        raise fail(str(err)) from None
    claim = claim_output(output, "folder", "eval geneval", overwrite)
    loaded = load_generator_for_cli(model, tokenizer, device)
    if not plans:  # the model's own sampler defaults (the official ones for a converted official model)
        name = sampler_defaults(loaded.model.config.sampler_defaults).schedule
        plans = {name: get_schedule(name)}
    reports = {}
    for name, schedule in plans.items():
        settings = loaded.default_settings(schedule=schedule, cfg=cfg, temperature=temperature, seed=seed,
                                           samples_per_prompt=samples, batch_size=batch_size)
        folder = claim.tmp / name.replace(":", "_").replace(",", "-")
        with open_count_bar(f"geneval {name}") as bar:
            task = bar.add_task(name, total=None)
            reports[name] = run_geneval(loaded, settings, folder, per_tag, prompt_seed,
                                        lambda k, task=task: bar.advance(task, k))
    ceiling = detector_ceiling(loaded.tokenizer.image_size)
    report = {"model": loaded.source, "tokenizer": loaded.tokenizer_source, "random_init": loaded.random_init,
              "schedules": reports, "detector_on_real_images": ceiling}
    claim.tmp.mkdir(parents=True, exist_ok=True)
    atomic_write_text(claim.tmp / "report.json", json.dumps(report, indent=2))
    claim.commit()
    table = Table(title="GenEval (shapes world)")
    table.add_column("tag")
    for name in reports:
        table.add_column(name, justify="right")
    table.add_column("real images", justify="right", style="dim")
    tags = list(next(iter(reports.values()))["per_tag"])
    for tag in [*tags, "overall"]:
        cells = [r["per_tag"][tag] if tag != "overall" else r["overall"] for r in [*reports.values(), ceiling]]
        table.add_row(tag, *(f"{c:.3f}" for c in cells))
    console.print(table)
    n = next(iter(reports.values()))["images_per_tag"]
    console.print(f"{min(n.values())}-{max(n.values())} images per tag; 'real images': the detector on "
                  f"{ceiling['images']} rendered held-out images at {loaded.tokenizer.image_size} px (its ceiling)")
    console.print(f"wrote [bold]{output / 'report.json'}[/]")
