"""The generator's commands: `generate` and `train-generator`, thin layers over
tokenflow_cli.generation (pipeline, stage). `eval geneval` is in eval_cmd.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import (
    CompileOpt,
    DeviceOpt,
    OverwriteOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    app,
    claim_output,
    console,
    fail,
)
from tokenflow_cli.cli.models import (
    CfgOpt,
    GenBatchOpt,
    GenModelOpt,
    ImageTokenizerOpt,
    TemperatureOpt,
    load_generator_for_cli,
    open_count_bar,
)
from tokenflow_cli.cli.training import run_training

PresetOpt = Annotated[
    str | None, typer.Option("--preset", help="Named schedule: one-pass (600,0.6), two-pass, three-pass.")
]
PassesOpt = Annotated[
    str | None, typer.Option("--passes", help='Passes as top_k:top_p, e.g. "1200:0.8,100:0.8,1:0".')
]
GenDtypeOpt = Annotated[str | None, typer.Option("--dtype", help="fp32 | bf16 | fp16 (default: the weights' own).")]
TopPOpt = {"min": 0.0, "max": 1.0}  # top-p is a probability (0 turns it off)
CacheOpt = Annotated[bool, typer.Option("--cache/--no-cache", help="KV cache (--no-cache recomputes, as official).")]


def _schedule(preset: str | None, passes: str | None, pairs: list[tuple[int | None, float | None]]):
    """The schedule the options name, or None for the model's default."""
    from tokenflow_cli.generation.sampling import get_schedule, schedule_from_pairs

    explicit = schedule_from_pairs(pairs)
    if sum(bool(x) for x in (preset, passes, explicit)) > 1:
        raise fail("give one of --preset, --passes or --k1/--p1/... ")
    try:
        return explicit or (get_schedule(preset or passes) if preset or passes else None)
    except ValueError as err:
        raise fail(str(err)) from None


def _effective_note(schedule, vocab: int) -> str:
    """What a top-k at or above the codebook size means, said beside the asked schedule: it keeps
    every code ("--k1 1200" over K = 512 is no top-k)."""
    if not any(p.top_k >= vocab for p in schedule):
        return ""
    effective = ",".join(f"{p.top_k if 0 < p.top_k < vocab else 'all'}:{p.top_p:g}" for p in schedule)
    return f" (effective over K = {vocab} codes: {effective}; top-k >= K keeps every code)"


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str | None, typer.Argument(help="Text prompt (or use --prompts FILE).")] = None,
    n: Annotated[int, typer.Option("-n", "--num-images", min=1, help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    cfg: CfgOpt = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="Unconditional prompt for CFG "
                               "(default: the model's; the official one for a converted official model).")] = None,
    k1: Annotated[int | None, typer.Option("--k1", help="Top-k of pass 1 (<= 0: off).")] = None,
    p1: Annotated[float | None, typer.Option("--p1", **TopPOpt, help="Top-p of pass 1 (0 or 1: off).")] = None,
    k2: Annotated[int | None, typer.Option("--k2", help="Top-k of pass 2 (re-predicts each scale).")] = None,
    p2: Annotated[float | None, typer.Option("--p2", **TopPOpt, help="Top-p of pass 2.")] = None,
    k3: Annotated[int | None, typer.Option("--k3", help="Top-k of pass 3.")] = None,
    p3: Annotated[float | None, typer.Option("--p3", **TopPOpt, help="Top-p of pass 3.")] = None,
    passes: PassesOpt = None,
    preset: PresetOpt = None,
    temperature: TemperatureOpt = 1.0,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="File of prompts (.txt lines or .jsonl).")] = None,
    geneval: Annotated[Path | None, typer.Option("--geneval", help="GenEval metadata (evaluation_metadata.jsonl): "
                       "write the official evaluator's layout into -o, -n per prompt; resumes.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for PNGs, grid.png, settings.json.")] = Path(
        "generated"),
    model: GenModelOpt = None,
    tokenizer: ImageTokenizerOpt = None,
    batch_size: GenBatchOpt = 16,
    cache: CacheOpt = True,
    dtype: GenDtypeOpt = None,
    compile_decoder: CompileOpt = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Text -> images: next-scale sampling with CFG, multi-pass re-prediction and a KV cache.
    The folder is written beside -o and swapped in whole once every image is done."""
    if sum(x is not None for x in (prompt, prompts, geneval)) != 1:
        raise fail("give one of PROMPT, --prompts FILE or --geneval METADATA")
    if geneval is not None:
        from tokenflow_cli.data.captions import read_geneval_metadata

        try:
            metadata = read_geneval_metadata(geneval)  # checked before torch and any model load
        except (OSError, ValueError) as err:
            raise fail(str(err)) from None
        schedule = _schedule(preset, passes, [(k1, p1), (k2, p2), (k3, p3)])
        _geneval(geneval, metadata, output, model, tokenizer, device, dtype, schedule,
                 dict(cfg=cfg, negative_prompt=negative_prompt, temperature=temperature, seed=seed,
                      samples_per_prompt=n, batch_size=batch_size, use_cache=cache))
        return
    from tokenflow_cli.data.captions import read_prompts_file

    try:
        texts = read_prompts_file(prompts) if prompts else [prompt]
    except (OSError, ValueError) as err:
        raise fail(str(err)) from None
    if not texts:
        raise fail(f"{prompts}: no prompts")
    claim = claim_output(output, "folder", "generate", overwrite)  # before torch and any model load
    from tokenflow_cli.generation.outputs import write_outputs
    from tokenflow_cli.generation.sampling import format_schedule
    from tokenflow_cli.generation.text_to_image import generate_images
    schedule = _schedule(preset, passes, [(k1, p1), (k2, p2), (k3, p3)])
    pipe = load_generator_for_cli(model, tokenizer, device, dtype)
    if compile_decoder:  # the image decoder (codes -> pixels); the LM's KV-cache shapes change every scale
        from tokenflow_cli.tokenizer.inference import InferenceOptions, prepare_for_inference

        prepare_for_inference(pipe.tokenizer, InferenceOptions(compile=True, scope="decoders"))
    try:
        settings = pipe.default_settings(schedule=schedule, cfg=cfg, negative_prompt=negative_prompt,
                                           temperature=temperature, seed=seed, samples_per_prompt=n,
                                           batch_size=batch_size, use_cache=cache)
    except ValueError as err:
        raise fail(str(err)) from None
    negative = repr(settings.negative_prompt[:40] + ("..." if len(settings.negative_prompt) > 40 else ""))
    vocab = pipe.tokenizer.codebook_size
    schedule_text = format_schedule(settings.schedule) + _effective_note(settings.schedule, vocab)
    console.print(f"settings: schedule {schedule_text}, cfg {settings.cfg:g}, negative prompt "
                  f"{negative}, top-k ties {'kept' if settings.keep_ties else 'broken by index'}, "
                  f"KV cache {'on' if cache else 'off'}", highlight=False)
    with open_count_bar("generate") as bar:
        task = bar.add_task("generate", total=len(texts) * n)
        try:
            result = generate_images(pipe, texts, settings, lambda k: bar.advance(task, k))
        except ValueError as err:
            raise fail(str(err)) from None
    extra = {"model": pipe.source, "tokenizer": pipe.tokenizer_source, "random_init": pipe.random_init,
             "dtype": str(pipe.dtype).removeprefix("torch.")}
    write_outputs(claim.tmp, result, settings, extra)
    claim.commit()
    console.print(f"{len(result.images)} images ({result.images_per_s:.2f} img/s) -> [bold]{output}[/] "
                  "(grid.png, settings.json)")


def _geneval(metadata_file: Path, metadata: list[dict], output: Path, model: str | None, tokenizer: str | None,
             device: str, dtype: str | None, schedule, given: dict) -> None:
    """`generate --geneval`: GenEval's evaluator layout, resumable, prompt groups split over torchrun ranks."""
    from tokenflow_cli.distributed import barrier, init_distributed
    from tokenflow_cli.generation.geneval_export import check_geneval_layout, export_geneval, export_record, open_export
    from tokenflow_cli.generation.sampling import format_schedule
    pipe = load_generator_for_cli(model, tokenizer, device, dtype)
    dist = init_distributed(next(pipe.model.parameters()).device.type)
    try:
        settings = pipe.default_settings(schedule=schedule, **given)
        record = export_record(pipe, metadata_file, len(metadata), settings)
        if dist.is_main:
            resumed = open_export(output, record)
        barrier()
        if not dist.is_main:
            resumed = open_export(output, record)  # checks what rank 0 wrote
    except ValueError as err:
        raise fail(str(err)) from None
    if dist.is_main:  # the other ranks only checked the settings rank 0 wrote
        console.print(f"GenEval: {len(metadata)} prompts x {settings.samples_per_prompt} -> [bold]{output}[/]"
                      f"{' (resuming)' if resumed else ''}; schedule {format_schedule(settings.schedule)}, "
                      f"cfg {settings.cfg:g}, negative prompt {settings.negative_prompt[:30]!r}", highlight=False)
    with open_count_bar("geneval") as bar:
        task = bar.add_task("geneval", total=-(-len(metadata) // dist.world_size) * settings.samples_per_prompt)
        done = export_geneval(pipe, metadata, output, settings, rank=dist.rank, world_size=dist.world_size,
                              progress=lambda k: bar.advance(task, k))
    barrier()
    if not dist.is_main:
        return
    check = check_geneval_layout(output, metadata, settings.samples_per_prompt)
    if check["problems"]:
        raise fail(f"{output}: GenEval layout incomplete: {check['problems'][0]}")
    console.print(f"{check['prompts']} prompt folders, {check['images']} images ({done.generated} prompts "
                  f"generated here, {done.reused} reused); score them with GenEval's evaluation/evaluate_images.py")


@app.command("train-generator")
def train_generator_cmd(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (default runs/NAME).")] = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Train the next-scale text-to-image generator on captioned codes (or images)."""
    from tokenflow_cli.generation.config import GeneratorRecipe

    def train(r, run_dir: Path):
        from tokenflow_cli.cli.common import quiet_transformers
        from tokenflow_cli.generation.stage import train_generator

        quiet_transformers()
        return train_generator(r, run_dir, device=device, resume=resume)

    run = run_training(recipe, GeneratorRecipe, list(overrides or []), output, lambda r: r.model.name, train)
    if run is None:
        return
    result, run_dir = run.result, run.run_dir
    console.print(f"trained {result.step} steps in {result.seconds:.0f}s -> [bold]{run_dir}[/]")
