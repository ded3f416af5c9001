"""The tokenizer's commands: `tokenize`, `reconstruct` and `train-tokenizer`, thin layers over
tokenflow_cli.tokenizer (pipeline, reconstruct, stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import (
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    InferDtypeOpt,
    ModelOpt,
    OverwriteOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    StrictOpt,
    app,
    claim_output,
    console,
    err_console,
    fail,
)
from tokenflow_cli.cli.training import run_training


def _load_model(model: str | None, device: str, codes: Path | None = None, dtype: str = "fp32",
                compile_model: bool = False, scope: str = "all"):
    """The tokenizer to use; for a codes file, the one that made it (from its metadata, or
    --model checked against it). With --dtype/--compile it is prepared for fast inference
    (tokenizer/inference.py; the default fp32 path is left exactly as it was)."""
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.tokenizer.codes import list_codes_files, read_codes_meta
    from tokenflow_cli.tokenizer.identity import resolve_tokenizer_for_codes
    from tokenflow_cli.tokenizer.inference import InferenceOptions, prepare_for_inference
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer

    try:
        if codes is None:
            tok = resolve_tokenizer(model, resolve_device(device))
        else:
            first = list_codes_files(codes)[0]  # a codes file, or the first shard of a sharded folder
            tok = resolve_tokenizer_for_codes(read_codes_meta(first), model, resolve_device(device), codes)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    note = " [bold yellow](random init: outputs are meaningless)[/]" if tok.random_init else ""
    console.print(f"model: [cyan]{tok.source}[/]{note}")
    if dtype != "fp32" or compile_model:
        try:
            options = InferenceOptions.from_name(dtype, compile=compile_model, scope=scope)
        except ValueError as err:
            raise fail(str(err)) from None
        prepare_for_inference(tok, options)
        parts = "encoders and decoders" if scope == "all" else "decoders (encoders fp32: the same codes)"
        console.print(f"inference: {parts} in {dtype}{', compiled' if compile_model else ''}; code search in fp32")
    return tok


def _list_inputs(source: str) -> list[Path]:
    from tokenflow_cli.data.images import list_images

    try:
        return list_images(source)
    except (FileNotFoundError, ValueError) as err:  # ImageSourceError is a ValueError
        raise fail(str(err)) from None


def _open_inputs(spec: str, image_column: str | None):
    from tokenflow_cli.data.sources import open_source

    try:
        return open_source(spec, image_column)
    except (FileNotFoundError, ValueError) as err:  # ImageSourceError is a ValueError
        raise fail(str(err)) from None


def _report_failures(failures: list[tuple[str, str]], strict: bool) -> None:
    if not failures:
        return
    err_console.print(f"[yellow]skipped {len(failures)} unreadable file(s):[/]")
    for path, reason in failures[:10]:
        err_console.print(f"  {path}: {reason}")
    if len(failures) > 10:
        err_console.print(f"  ... and {len(failures) - 10} more")


ShardSizeOpt = Annotated[int | None, typer.Option(
    "--shard-size", min=1, help="Write -o DIR as codes-00000.npz ... of N images each plus manifest.json (resumable).")]
ImageColumnOpt = Annotated[str | None, typer.Option(
    "--image-column", help="Image column of a datasets/parquet input (default: the first image-typed one).")]


@app.command("tokenize")
def tokenize_cmd(
    inputs: Annotated[str, typer.Argument(help=(
        "Images: a folder (recursive), glob, list file, webdataset .tar shards (path, glob or "
        "{000..099} pattern), a `datasets` save_to_disk folder, or .parquet files."))],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Codes file to write (.npz); with --shard-size, a folder.")] = Path("codes.npz"),
    model: ModelOpt = None,
    batch_size: BatchOpt = 16,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Image decoding threads.")] = 0,
    shard_size: ShardSizeOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="With --shard-size: keep the finished shards in -o and do the rest.")] = False,
    image_column: ImageColumnOpt = None,
    strict: StrictOpt = False,
    device: DeviceOpt = "auto",
    dtype: InferDtypeOpt = "fp32",
    compile_model: CompileOpt = False,
) -> None:
    """Images -> multi-scale shared indices in one .npz (per-scale views in the reader), or a
    resumable folder of shards (--shard-size). Runs under torchrun across processes and nodes."""
    if resume and shard_size is None:
        raise fail("--resume needs --shard-size (a one-file output is written whole or not at all)")
    claim = claim_output(output, "run" if shard_size else "file", "tokenize")  # before any image is encoded
    source = _open_inputs(inputs, image_column)
    # torch comes in from here on: a bad input or output above fails without its start-up
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.data.images import ImageLoadError
    from tokenflow_cli.errors import UserError
    from tokenflow_cli.tokenizer.sharded import tokenize_distributed
    from tokenflow_cli.tokenizer.shards import tokenize_to_shards

    tok = _load_model(model, device, dtype=dtype, compile_model=compile_model)
    if dtype != "fp32":
        err_console.print(f"note: {dtype} codes differ from fp32 codes index for index but reconstruct as well "
                          "(docs/RESULTS.md, 'Fast tokenize modes'); use fp32 where codes must match fp32 codes")
    with image_progress(source.count or 0, "tokenize") as update:
        try:
            if shard_size:
                result = tokenize_to_shards(tok, source, output, shard_size, batch_size, workers, strict,
                                            resume, update)
            else:
                result = tokenize_distributed(tok, source, output, batch_size, workers, strict, update)
        except ImageLoadError as err:
            raise fail(f"--strict: {err}") from None
        except UserError as err:  # a run that cannot resume, a full disk
            raise fail(str(err)) from None
    claim.commit()
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    _report_failures(result.failures, strict)
    shards = (f" in {result.total_shards} shards ({result.shards_skipped} already done, "
              f"{result.shards_written} written)" if shard_size else "")
    console.print(
        f"wrote [bold]{result.output}[/]: {result.n_images} images x {tok.num_tokens} tokens{shards}, "
        f"scales {list(tok.scales)}, {result.images_per_s:.1f} images/s, "
        f"codebook usage {100 * result.usage_share:.1f}% of {tok.codebook_size}"
    )


@app.command("reconstruct")
def reconstruct_cmd(
    inputs: Annotated[str, typer.Argument(help="Images (folder/glob/list) or a codes file (.npz).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs and grid.")] = Path("recon"),
    model: ModelOpt = None,
    batch_size: BatchOpt = 16,
    strict: StrictOpt = False,
    max_grid: Annotated[int, typer.Option("--max-grid", min=1, help="Rows in grid.png.")] = 16,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: InferDtypeOpt = "fp32",
    compile_model: CompileOpt = False,
) -> None:
    """Images or a codes file -> reconstructed PNGs, plus an original | reconstruction grid.
    The folder is written beside -o and swapped in whole when every image is done."""
    from tokenflow_cli.tokenizer.codes import MANIFEST_NAME

    is_codes = (inputs.endswith(".npz") and Path(inputs).is_file()) or (Path(inputs) / MANIFEST_NAME).is_file()
    claim = claim_output(output, "folder", "reconstruct", overwrite)
    paths = [] if is_codes else _list_inputs(inputs)  # a bad input fails here, before torch loads
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.data.images import ImageLoadError
    from tokenflow_cli.tokenizer.reconstruct import reconstruct_codes_file, reconstruct_images

    tok = _load_model(model, device, Path(inputs) if is_codes else None, dtype, compile_model, "decoders")
    total = 0 if is_codes else len(paths)
    with image_progress(total, "reconstruct") as update:
        try:
            if is_codes:
                result = reconstruct_codes_file(tok, Path(inputs), claim.tmp, batch_size, max_grid, update)
            else:
                result = reconstruct_images(tok, paths, claim.tmp, batch_size, strict, max_grid, update)
        except (ImageLoadError, ValueError) as err:
            raise fail(str(err)) from None
    claim.commit()
    _report_failures(result.failures, strict)
    psnr = f", PSNR {result.psnr:.2f} dB vs originals" if result.psnr is not None else ""
    grid = output / result.grid_path.name if result.grid_path else None
    console.print(f"wrote {result.n_images} reconstructions to [bold]{output}[/]{psnr}; grid: {grid}")


RunDirOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Run folder (checkpoints, logs); default runs/<model.name>.")
]
OptionalSeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (default: train.seed).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: train.steps).")]


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: RunDirOpt = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "auto",
    seed: OptionalSeedOpt = None,
    steps: StepsOpt = None,
) -> None:
    """Train the tokenizer; live losses and codebook usage per scale. Runs under torchrun as DDP.

    Resumes automatically when the run folder holds a checkpoint (--no-resume starts over).
    """
    from tokenflow_cli.tokenizer.config import TokenizerRecipe

    def train(r, run_dir: Path):
        from tokenflow_cli.tokenizer.stage import train_tokenizer

        return train_tokenizer(r, run_dir, device=device, resume=resume)

    extra = [*(overrides or []), *([f"train.seed={seed}"] if seed is not None else []),
             *([f"train.steps={steps}"] if steps is not None else [])]
    run = run_training(recipe, TokenizerRecipe, extra, output, lambda r: r.model.name, train)
    if run is None:  # under torchrun rank 0 reports
        return
    result, run_dir = run.result, run.run_dir
    ev = result.last_eval
    figures = f"PSNR {ev['psnr']:.2f} dB, codebook usage {ev['usage']:.1%} (held-out) " if "psnr" in ev else ""
    state = "stopped early at" if result.stopped_early else "finished"
    console.print(f"{state} step {result.step}: {figures}{result.images_per_s:.1f} images/s; "
                  f"weights [bold]{run_dir / 'model.safetensors'}[/]")
