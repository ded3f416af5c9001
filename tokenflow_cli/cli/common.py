"""The Typer app, the Rich console and option aliases shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="tokenflow",
    help="TokenFlow unified image tokenizer toolkit: train, tokenize, reconstruct, generate, understand, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Checkpoint (.safetensors) or run folder; default: the built-in tokenizer."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write the output.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: --set train.lr=3e-4 (repeatable)."),
]
RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name (e.g. tiny).")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Resume from the run folder's last checkpoint (auto).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable input instead of skipping it.")]


def positive(value: float | None) -> float | None:
    """Option callback: a value that must be > 0 (a temperature, a scale)."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be > 0, got {value:g}")
    return value


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error in red and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def quiet_transformers() -> None:
    """No tqdm bars or advisory warnings from transformers inside our own output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
