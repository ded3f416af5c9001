"""`tokenflow codes info|merge`: inspect and join codes files and sharded codes folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokenflow_cli.cli.common import claim_output, console, fail

codes_app = typer.Typer(
    name="codes",
    help="Inspect and merge codes files (`tokenize` outputs, sharded folders included).",
    no_args_is_help=True,
)

CodesArg = Annotated[str, typer.Argument(help="A codes file, a sharded codes folder, or the base name of shards.")]


@codes_app.command("info")
def info_cmd(path: CodesArg) -> None:
    """Images, the tokenizer that made them, and codebook usage per scale."""
    from tokenflow_cli.errors import UserError
    from tokenflow_cli.tokenizer.codes import list_codes_files

    try:
        list_codes_files(path)  # a missing input fails here, before torch loads
        from tokenflow_cli.tokenizer.codes_summary import summarize_codes

        summary = summarize_codes(path)
    except (UserError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    tok = summary.tokenizer
    sha = f" (sha256 {tok['sha256'][:12]})" if tok.get("sha256") else ""
    random_note = " [bold yellow](random init)[/]" if tok.get("random_init") else ""
    console.print(f"[bold]{summary.path}[/]: {summary.images} images in {len(summary.files)} file(s), "
                  f"{summary.failed} skipped as unreadable")
    console.print(f"tokenizer: {tok.get('name')} from {tok.get('source')}{sha}{random_note}")
    if summary.manifest:
        state = "complete" if summary.manifest["complete"] else "incomplete (resume with --resume)"
        console.print(f"shards: {summary.manifest['done']} of {summary.manifest['total_shards'] or '?'} done, {state}")
    table = Table(title=f"codebook usage, K = {summary.codebook_size}", title_justify="left")
    for column in ("scale", "usage", "perplexity"):
        table.add_column(column, justify="right")
    for row in summary.per_scale:
        table.add_row(f"{row['scale']}x{row['scale']}", f"{row['usage']:.1%}", f"{row['perplexity']:.1f}")
    table.add_row("all", f"{summary.usage:.1%}", f"{summary.perplexity:.1f}", style="bold")
    console.print(table)


@codes_app.command("merge")
def merge_cmd(
    inputs: Annotated[list[str], typer.Argument(help="Codes files and/or sharded folders, in order.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The merged codes file (.npz).")],
) -> None:
    """Join codes made by one tokenizer into one file (refused across tokenizers or scales)."""
    from tokenflow_cli.errors import UserError
    from tokenflow_cli.tokenizer.codes import list_codes_files, merge_codes

    claim = claim_output(output, "file", "codes merge")
    try:
        files = [f for spec in inputs for f in list_codes_files(spec)]
        if any(f.resolve() == output.resolve() for f in files):
            raise fail(f"output {output} is one of the inputs; write the merge elsewhere")
        merged = merge_codes(files, output)
    except (UserError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    claim.commit()
    console.print(f"wrote [bold]{output}[/]: {len(merged)} images from {len(files)} file(s)")
