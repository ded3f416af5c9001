"""`tokenize`, `reconstruct`, `doctor`: thin layers over tokenflow_cli.inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import BatchOpt, DeviceOpt, ModelOpt, StrictOpt, app, console, err_console, fail


def _load_model(model: str | None, device: str):
    from tokenflow_cli.device import resolve_device
    from tokenflow_cli.inference import resolve_tokenizer

    resolved = resolve_tokenizer(model, resolve_device(device))
    note = " [bold yellow](random init: outputs are meaningless)[/]" if resolved.random_init else ""
    console.print(f"model: [cyan]{resolved.source}[/]{note}")
    return resolved


def _list_inputs(source: str) -> list[Path]:
    from tokenflow_cli.data.images import list_images

    try:
        return list_images(source)
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


@app.command("tokenize")
def tokenize_cmd(
    inputs: Annotated[str, typer.Argument(help="Folder (recursive), glob, or text file of image paths.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Codes file to write (.npz).")] = Path("codes.npz"),
    model: ModelOpt = None,
    batch_size: BatchOpt = 16,
    workers: Annotated[int, typer.Option("--workers", "-j", help="DataLoader worker processes.")] = 0,
    strict: StrictOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Images -> multi-scale shared indices in one .npz (per-scale views in the reader)."""
    from tokenflow_cli.data.images import ImageLoadError
    from tokenflow_cli.distributed import tokenize_distributed

    resolved = _load_model(model, device)
    paths = _list_inputs(inputs)
    from tokenflow_cli.cli.progress import image_progress

    with image_progress(len(paths), "tokenize") as update:
        try:
            result = tokenize_distributed(resolved, paths, output, batch_size, workers, strict, update)
        except ImageLoadError as err:
            raise fail(f"--strict: {err}") from None
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    _report_failures(result.failures, strict)
    console.print(
        f"wrote [bold]{result.output}[/]: {result.n_images} images x {resolved.tokenizer.num_tokens} tokens, "
        f"scales {list(resolved.tokenizer.scales)}, {result.images_per_s:.1f} images/s, "
        f"codebook usage {100 * result.usage_share:.1f}% of {resolved.tokenizer.codebook_size}"
    )


@app.command("reconstruct")
def reconstruct_cmd(
    inputs: Annotated[str, typer.Argument(help="Images (folder/glob/list) or a codes file (.npz).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs and grid.")] = Path("recon"),
    model: ModelOpt = None,
    batch_size: BatchOpt = 16,
    strict: StrictOpt = False,
    max_grid: Annotated[int, typer.Option("--max-grid", help="Rows in grid.png.")] = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Images or a codes file -> reconstructed PNGs, plus an original | reconstruction grid."""
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.data.images import ImageLoadError
    from tokenflow_cli.reconstruct import reconstruct_codes_file, reconstruct_images

    resolved = _load_model(model, device)
    is_codes = inputs.endswith(".npz") and Path(inputs).is_file()
    paths = [] if is_codes else _list_inputs(inputs)
    total = 0 if is_codes else len(paths)
    with image_progress(total, "reconstruct") as update:
        try:
            if is_codes:
                result = reconstruct_codes_file(resolved, Path(inputs), output, batch_size, max_grid, update)
            else:
                result = reconstruct_images(resolved, paths, output, batch_size, strict, max_grid, update)
        except (ImageLoadError, ValueError) as err:
            raise fail(str(err)) from None
    _report_failures(result.failures, strict)
    psnr = f", PSNR {result.psnr:.2f} dB vs originals" if result.psnr is not None else ""
    console.print(f"wrote {result.n_images} reconstructions to [bold]{output}[/]{psnr}; grid: {result.grid_path}")


@app.command("doctor")
def doctor_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Versions, device, threads, and which optional pretrained weights are found."""
    from rich.table import Table

    from tokenflow_cli.doctor import collect

    report = collect()
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table(title="tokenflow doctor", show_lines=False)
    table.add_column("item")
    table.add_column("status")
    for key, value in report["versions"].items():
        table.add_row(key, str(value))
    for key, value in report["runtime"].items():
        table.add_row(key, str(value))
    for item in report["weights"]:
        mark = "[green]found[/]" if item["found"] else "[yellow]missing[/]"
        table.add_row(item["name"], f"{mark} {item['path']}" + ("" if item["found"] else f"  ({item['how']})"))
    console.print(table)
