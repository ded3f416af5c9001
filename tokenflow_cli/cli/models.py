"""Model options and loaders shared by several commands (`generate` and `eval geneval` load a
generator the same way, `ask` and `eval vqa` an understanding model, `eval rfid|usage|atlas` a
tokenizer and their images), so command modules never import each other."""

from __future__ import annotations

from typing import Annotated

import typer

from tokenflow_cli.cli.common import console, err_console, fail, positive, quiet_transformers

GenModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Generator run folder or checkpoint (default: the demo's generator, "
                 "$TOKENFLOW_GENERATOR or ~/.cache/tokenflow/generator)."),
]
ImageTokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Image tokenizer to use instead of the one the run names.")
]
CfgOpt = Annotated[float | None, typer.Option("--cfg", min=0.0, help="Guidance at the last scale (ramps linearly "
                   "from 0; default: the model's, 7.5 for a converted official model, else 3).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", callback=positive, help="Softmax temperature (> 0).")]
GenBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]


def load_generator_for_cli(model: str | None, tokenizer: str | None, device: str, dtype: str | None = None):
    """The `TextToImage` pipeline `--model` names (or the default), announced on the console."""
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.generation.text_to_image import resolve_generator

    quiet_transformers()
    try:
        pipe = resolve_generator(model, resolve_device(device), tokenizer, dtype)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    note = " [bold yellow](random init: outputs are meaningless)[/]" if pipe.random_init else ""
    cfg = pipe.model.config
    console.print(f"generator: [cyan]{pipe.source}[/]{note}\n  {cfg.name}: {cfg.lm_arch}, "
                  f"{str(pipe.dtype).removeprefix('torch.')}, next-scale inputs {cfg.next_scale_input}, "
                  f"multi-step {cfg.multi_step}, text layout {cfg.text_layout}\n"
                  f"image tokenizer: [cyan]{pipe.tokenizer_source}[/]", highlight=False)
    return pipe


def open_count_bar(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)


PRECISION_NAMES = ("fp32", "bf16", "fp16")


def precision_name(value: str | None) -> str | None:
    """Option callback: auto or a precision name (checked at parse time, torch not imported)."""
    if value is not None and value not in ("auto", *PRECISION_NAMES):
        raise typer.BadParameter(f"{value!r} is not one of auto, {', '.join(PRECISION_NAMES)}")
    return value


def load_for_inference(model: str | None, tokenizer: str | None, device: str, dtype: str = "auto"):
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.understanding.pipeline import Understanding

    quiet_transformers()
    try:
        loaded = Understanding.from_pretrained(model, device=resolve_device(device), tokenizer=tokenizer, dtype=dtype)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    for warning in loaded.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
    return loaded


def use_decoding(loaded, repetition_penalty: float | None) -> None:
    """The folder's decoding settings (generation_config.json), with the options given."""
    loaded.model.decoding = loaded.model.decoding.override(repetition_penalty=repetition_penalty)


def resolve_tokenizer_for_cli(model: str | None, device: str):
    """The tokenizer `--model` names (or the default), announced on the console."""
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer

    tok = resolve_tokenizer(model, resolve_device(device))
    note = " [bold yellow](RANDOM INIT: numbers are meaningless)[/]" if tok.random_init else ""
    console.print(f"model: [cyan]{tok.source}[/]{note}")
    return tok


def check_image_source(data: str | None) -> None:
    """A missing or empty --data fails here, before torch loads (the built-in set is made later)."""
    if data is None:
        return
    from tokenflow_cli.data.images import list_images

    try:
        list_images(data)
    except (FileNotFoundError, ValueError) as err:  # ImageSourceError is a ValueError
        raise fail(str(err)) from None


def image_subsets(data: str | None, limit: int, res: int):
    """The images given, or the built-in held-out set at `res`, each subset announced."""
    from tokenflow_cli.eval.evalset import builtin_eval_set, folder_subset

    try:
        subsets = [folder_subset(data, limit)] if data else builtin_eval_set(res, limit)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    for s in subsets:
        console.print(f"data [bold]{s.name}[/]: {s.description}")
    return subsets
