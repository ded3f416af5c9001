"""`tokenflow convert`: a released official model -> ours. A `.pt` is a TokenFlow tokenizer
(-> our .safetensors); a Hugging Face folder is dispatched on its config.json `model_type`:
the text-to-image model (`llava_llama`, generation/convert.py) or the understanding model
(understanding/convert.py), both written as a run folder. The t2i model takes its image
tokenizer with `--tokenizer`; the LLaVA model carries the copy its folder embeds (`--tokenizer`
is then compared with it, or replaces it with `--override-tokenizer`)."""

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
    typer.Option("--recipe", help="Recipe whose model section describes the tokenizer (custom official models; "
                 "for a LLaVA folder, its embedded copy). Sizes the file states must agree with it."),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="float32 | bfloat16 | float16 for floating tensors (default: tokenizer float32, "
                 "hub folders their stored dtype)."),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option("--tokenizer", help="Image tokenizer for a hub folder: ours (.safetensors / run folder) or the "
                 "official .pt (converted into the run folder). A LLaVA folder runs the copy it embeds: this one is "
                 "compared with it (and replaces it with --override-tokenizer)."),
]
OverrideOpt = Annotated[
    bool,
    typer.Option("--override-tokenizer", help="LLaVA folder: use --tokenizer instead of the embedded copy "
                 "(the release runs the copy; answers will differ)."),
]


@app.command("convert")
def convert_cmd(
    source: Annotated[Path, typer.Argument(help="Official tokenizer (.pt), or a t2i / LLaVA Hugging Face folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint (.safetensors) or run folder to write.")],
    tokenizer: TokenizerOpt = None,
    variant: VariantOpt = None,
    recipe: RecipeOpt = None,
    dtype: DtypeOpt = None,
    override_tokenizer: OverrideOpt = False,
) -> None:
    """Import an official model: read without running pickled code, map every key, check every
    shape, write ours with the matching config."""
    start = time.perf_counter()
    if not source.exists():  # before torch loads: the first error of a mistyped path comes at once
        raise fail(f"official checkpoint not found: {source}")
    if source.is_dir():
        lines = _convert_folder(source, output, tokenizer, dtype, recipe, override_tokenizer)
    else:
        lines = _convert_tokenizer(source, output, variant, recipe, dtype or "float32")
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"done in {time.perf_counter() - start:.1f} s")


def _convert_folder(source: Path, output: Path, tokenizer: Path | None, dtype: str | None, recipe: str | None,
                    override: bool) -> list[str]:
    from rich.markup import escape

    from tokenflow_cli.cli.common import quiet_transformers
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.generation.convert import convert_t2i, is_t2i_folder
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.convert import ConversionError
    from tokenflow_cli.understanding.convert import convert_llava, is_llava_folder

    if override and tokenizer is None:
        raise fail("--override-tokenizer needs --tokenizer")
    quiet_transformers()
    try:
        if is_t2i_folder(source):
            if tokenizer is None:
                raise fail(f"{source} is a text-to-image folder: give its image tokenizer with --tokenizer")
            return [escape(line) for line in convert_t2i(source, tokenizer, output, dtype).summary_lines()]
        if is_llava_folder(source):
            config = load_recipe(recipe, TokenizerRecipe).model if recipe else None
            report = convert_llava(source, tokenizer, output, dtype, tokenizer_config=config,
                                   override_tokenizer=override)
            return [escape(line) for line in report.summary_lines()]
    except (ConversionError, ConfigError, ValueError, OSError) as err:
        raise fail(str(err)) from None
    raise fail(f"{source}: config.json names neither the t2i model (llava_llama) nor a LLaVA model")


def _convert_tokenizer(source: Path, output: Path, variant: str | None, recipe: str | None, dtype: str) -> list[str]:
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.convert import ConversionError, convert_checkpoint

    try:
        config = load_recipe(recipe, TokenizerRecipe).model if recipe else None
        report = convert_checkpoint(source, output, variant=variant, config=config, dtype=dtype)
    except (ConversionError, ConfigError) as err:
        raise fail(str(err)) from None
    others = f" (also in the file: {', '.join(report.other_entries)})" if report.other_entries else ""
    lines = [f"read [cyan]{report.source}[/]: entry [bold]{report.entry}[/]{others}"]
    if report.steps is not None:
        lines.append(f"  trained steps: {report.steps}")
    lines.append(f"variant [bold]{report.variant}[/] ({report.variant_reason})")
    if report.stripped_module_prefix:
        lines.append(f"  stripped `module.` from {report.stripped_module_prefix} keys")
    lines.append(f"mapped {report.official_keys} official entries -> {report.written_keys} of ours, "
                 f"{report.parameters:,} floating elements as {report.dtype}")
    lines += [f"  not carried: [yellow]{key}[/]: {reason}" for key, reason in report.not_carried.items()]
    lines += [f"  fresh (zeros): {key}: {reason}" for key, reason in report.fresh.items()]
    lines += [f"  note: {note}" for note in report.notes]
    lines.append(f"wrote [green]{output}[/] ({output.stat().st_size / 2**20:,.1f} MiB)")
    return lines
