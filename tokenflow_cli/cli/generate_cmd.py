"""`train-generator`, `generate` and `eval geneval`: thin layers over tokenflow_cli.generation,
train.generator_step and eval.geneval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import DeviceOpt, RecipeArg, ResumeOpt, SetOpt, app, console, fail
from tokenflow_cli.cli.eval_cmd import eval_app

GenModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Generator run folder or checkpoint (default: the demo's generator, "
                 "$TOKENFLOW_GENERATOR or ~/.cache/tokenflow/generator)."),
]
ImageTokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Image tokenizer to use instead of the one the run names.")
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", help="Named schedule: one-pass (600,0.6), two-pass, three-pass.")
]
PassesOpt = Annotated[
    str | None, typer.Option("--passes", help='Passes as top_k:top_p, e.g. "1200:0.8,100:0.8,1:0".')
]
CfgOpt = Annotated[float, typer.Option("--cfg", help="Guidance at the last scale (ramps linearly from 0).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Softmax temperature (> 0).")]
GenBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")]
CacheOpt = Annotated[bool, typer.Option("--cache/--no-cache", help="KV cache (--no-cache recomputes, as official).")]


def _schedule(preset: str | None, passes: str | None, pairs: list[tuple[int | None, float | None]],
              default: str = "two-pass"):
    from tokenflow_cli.sampling import get_schedule, schedule_from_pairs

    explicit = schedule_from_pairs(pairs)
    if sum(bool(x) for x in (preset, passes, explicit)) > 1:
        raise fail("give one of --preset, --passes or --k1/--p1/... ")
    try:
        return explicit or get_schedule(preset or passes or default)
    except ValueError as err:
        raise fail(str(err)) from None


def _load(model: str | None, tokenizer: str | None, device: str):
    from tokenflow_cli.cli.llava_cmd import quiet_transformers
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.generation import resolve_generator

    quiet_transformers()
    try:
        loaded = resolve_generator(model, resolve_device(device), tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    note = " [bold yellow](random init: outputs are meaningless)[/]" if loaded.random_init else ""
    console.print(f"generator: [cyan]{loaded.source}[/]{note}\nimage tokenizer: [cyan]{loaded.tokenizer_source}[/]")
    return loaded


def _count_progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str | None, typer.Argument(help="Text prompt (or use --prompts FILE).")] = None,
    n: Annotated[int, typer.Option("-n", "--num-images", help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    cfg: CfgOpt = 3.0,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Unconditional prompt for CFG.")] = "",
    k1: Annotated[int | None, typer.Option("--k1", help="Top-k of pass 1 (<= 0: off).")] = None,
    p1: Annotated[float | None, typer.Option("--p1", help="Top-p of pass 1 (0 or 1: off).")] = None,
    k2: Annotated[int | None, typer.Option("--k2", help="Top-k of pass 2 (re-predicts each scale).")] = None,
    p2: Annotated[float | None, typer.Option("--p2", help="Top-p of pass 2.")] = None,
    k3: Annotated[int | None, typer.Option("--k3", help="Top-k of pass 3.")] = None,
    p3: Annotated[float | None, typer.Option("--p3", help="Top-p of pass 3.")] = None,
    passes: PassesOpt = None,
    preset: PresetOpt = None,
    temperature: TemperatureOpt = 1.0,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="File of prompts (.txt lines or .jsonl).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for PNGs, grid.png, settings.json.")] = Path(
        "generated"),
    model: GenModelOpt = None,
    tokenizer: ImageTokenizerOpt = None,
    batch_size: GenBatchOpt = 16,
    cache: CacheOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Text -> images: next-scale sampling with CFG, multi-pass re-prediction and a KV cache."""
    from tokenflow_cli.generation import GenerationSettings, generate_images, read_prompts_file, write_outputs

    if (prompt is None) == (prompts is None):
        raise fail("give a PROMPT or --prompts FILE (not both)")
    try:
        texts = read_prompts_file(prompts) if prompts else [prompt]
    except (OSError, ValueError) as err:
        raise fail(str(err)) from None
    if not texts:
        raise fail(f"{prompts}: no prompts")
    schedule = _schedule(preset, passes, [(k1, p1), (k2, p2), (k3, p3)])
    settings = GenerationSettings(schedule, cfg, temperature, seed, n, negative_prompt, batch_size, cache)
    loaded = _load(model, tokenizer, device)
    with _count_progress("generate") as bar:
        task = bar.add_task("generate", total=len(texts) * n)
        try:
            result = generate_images(loaded, texts, settings, lambda k: bar.advance(task, k))
        except ValueError as err:
            raise fail(str(err)) from None
    extra = {"model": loaded.source, "tokenizer": loaded.tokenizer_source, "random_init": loaded.random_init}
    write_outputs(output, result, settings, extra)
    console.print(f"{len(result.images)} images ({result.images_per_s:.2f} img/s, schedule "
                  f"{settings.to_json()['schedule']}, cfg {cfg}) -> [bold]{output}[/] (grid.png, settings.json)")


@app.command("train-generator")
def train_generator_cmd(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (default runs/NAME).")] = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Train the next-scale text-to-image generator on captioned codes (or images)."""
    from tokenflow_cli.cli.llava_cmd import quiet_transformers
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.gen_config import GeneratorRecipe
    from tokenflow_cli.train.generator_step import GeneratorStage
    from tokenflow_cli.train.loop import NonFiniteLossError, train

    quiet_transformers()
    try:
        cfg = load_recipe(recipe, GeneratorRecipe, overrides)
    except ConfigError as err:
        raise fail(str(err)) from None
    run_dir = output or Path("runs") / cfg.model.name
    try:
        stage = GeneratorStage(cfg, run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    try:
        result = train(stage, cfg.train, run_dir, recipe=cfg, device=device, resume=resume)
    except (FileNotFoundError, ValueError, NonFiniteLossError) as err:
        raise fail(str(err)) from None
    console.print(f"trained {result.step} steps in {result.seconds:.0f}s -> [bold]{run_dir}[/]")


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

    from tokenflow_cli.checkpoint import atomic_write_text
    from tokenflow_cli.eval.geneval import run_geneval
    from tokenflow_cli.generation import GenerationSettings
    from tokenflow_cli.sampling import get_schedule

    names = [s.strip().replace(";", ",") for s in schedules.split(",") if s.strip()]
    try:
        plans = {name: get_schedule(name) for name in names}
    except ValueError as err:
        raise fail(str(err)) from None
    loaded = _load(model, tokenizer, device)
    reports = {}
    for name, schedule in plans.items():
        settings = GenerationSettings(schedule, cfg, temperature, seed, samples, "", batch_size)
        folder = output / name.replace(":", "_").replace(",", "-")
        with _count_progress(f"geneval {name}") as bar:
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
