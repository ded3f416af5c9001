"""The Typer app, the Rich console and option aliases shared by every command."""

from __future__ import annotations

import os
import sys
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
NON_TERMINAL_WIDTH = 100_000  # a pipe, a log file, CI: never wrap a line or cut a table cell


def fit_consoles_to_output() -> None:
    """On a terminal, Rich uses its width; elsewhere (no $COLUMNS) nothing is hard-wrapped or cut
    at 80 columns: a table, a path or a message stays on its line for grep and log readers."""
    for con in (console, err_console):
        con.width = None if con.is_terminal or os.environ.get("COLUMNS") else NON_TERMINAL_WIDTH


class CliState:
    """Set by the global options before a command runs."""

    debug: bool = False  # --debug or TOKENFLOW_DEBUG=1: show the traceback of a user error too
    context: typer.Context | None = None  # the invocation's root context (closed however the command ends)


def debug_from_env() -> bool:
    return os.environ.get("TOKENFLOW_DEBUG", "") not in ("", "0")


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    """TokenFlow unified image tokenizer toolkit: train, tokenize, reconstruct, generate, understand, evaluate."""
    CliState.debug = debug or debug_from_env()  # set afresh for every invocation
    CliState.context = ctx
    fit_consoles_to_output()

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
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
InferDtypeOpt = Annotated[str, typer.Option(
    "--dtype",
    help="Network precision: fp32 | bf16 | fp16 | tf32 (CUDA) (the code search stays fp32; see docs/RESULTS.md).")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the pixel encoder/decoder (slow first batch, faster after).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable input instead of skipping it.")]


def positive(value: float | None) -> float | None:
    """Option callback: a value that must be > 0 (a temperature, a scale)."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be > 0, got {value:g}")
    return value


def in_range(low: float, high: float, zero_means_default: bool = False):
    """Option callback: a number in [low, high] (or 0 when `zero_means_default`: "the model's"),
    checked when the command line is parsed, before anything loads; a usage error names the
    option and the range."""

    def check(value: float | None) -> float | None:
        if value is None or (zero_means_default and value == 0) or low <= value <= high:
            return value
        zero = " (or 0 for the default)" if zero_means_default else ""
        raise typer.BadParameter(f"{value:g} is not in {low:g}..{high:g}{zero}")

    return check


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error in red and return the exit to raise. Called while handling an
    exception with --debug on, it re-raises that exception instead (its traceback is wanted)."""
    if CliState.debug and sys.exc_info()[1] is not None:
        raise  # noqa: PLE0704  (the exception being handled by the caller)
    report_error(message)
    return typer.Exit(code)


def report_error(message: object) -> None:
    """The one `error:` line: whitespace in the message collapsed, never wrapped by Rich (a
    terminal may fold it visually; a pipe or log gets one line). Markup in it is not interpreted."""
    from rich.markup import escape

    text = " ".join(str(message).split()) or type(message).__name__
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an output folder that holds files this command did not write.")]


def claim_output(path: Path, kind: str, command: str, overwrite: bool = False):
    """`fileio.OutputClaim` for a command (call it before loading a model or reading inputs): a
    refused output is one `error:` line; the claim is released when the command ends, however it
    ends (an error, Ctrl-C), so nothing it made is left behind. Commit it once the work is done."""
    from tokenflow_cli.errors import UserError
    from tokenflow_cli.fileio import OutputClaim

    try:
        claim = OutputClaim(path, kind, command, overwrite)
    except UserError as err:
        raise fail(str(err)) from None
    if CliState.context is not None:
        CliState.context.call_on_close(claim.release)
    return claim


def quiet_transformers() -> None:
    """No tqdm bars or advisory warnings from transformers inside our own output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
