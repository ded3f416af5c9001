"""`tokenflow convert`: a released official TokenFlow tokenizer (.pt) -> our .safetensors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import app, console, fail

VariantOpt = Annotated[
    str | None,
    typer.Option("--variant", help="clipb-256-enhanced | clipb-224 | siglip-384 (default: guessed from the keys)."),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option("--recipe", help="Recipe whose model section describes the file (custom official models)."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 for floating tensors.")]


@app.command("convert")
def convert_cmd(
    source: Annotated[Path, typer.Argument(help="Official TokenFlow tokenizer checkpoint (.pt).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    variant: VariantOpt = None,
    recipe: RecipeOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Import an official tokenizer: read without running pickled code, map every key, check every
    shape, write our checkpoint with the matching recipe in its metadata."""
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.convert import ConversionError, convert_checkpoint

    start = time.perf_counter()
    try:
        config = load_recipe(recipe, TokenizerRecipe).model if recipe else None
        report = convert_checkpoint(source, output, variant=variant, config=config, dtype=dtype)
    except (ConversionError, ConfigError) as err:
        raise fail(str(err)) from None
    seconds = time.perf_counter() - start

    others = f" (also in the file: {', '.join(report.other_entries)})" if report.other_entries else ""
    console.print(f"read [cyan]{report.source}[/]: entry [bold]{report.entry}[/]{others}")
    if report.steps is not None:
        console.print(f"  trained steps: {report.steps}")
    console.print(f"variant [bold]{report.variant}[/] ({report.variant_reason})")
    if report.stripped_module_prefix:
        console.print(f"  stripped `module.` from {report.stripped_module_prefix} keys")
    console.print(
        f"mapped {report.official_keys} official entries -> {report.written_keys} of ours, "
        f"{report.parameters:,} floating elements as {report.dtype}"
    )
    for key, reason in report.not_carried.items():
        console.print(f"  not carried: [yellow]{key}[/]: {reason}")
    for key, reason in report.fresh.items():
        console.print(f"  fresh (zeros): {key}: {reason}")
    for note in report.notes:
        console.print(f"  note: {note}")
    size_mb = output.stat().st_size / 2**20
    console.print(f"wrote [green]{output}[/] ({size_mb:,.1f} MiB) in {seconds:.1f} s")
