"""`tokenflow eval atlas`: the image patches behind the most used codes (and a random sample), as
a PNG sheet, a self-contained HTML page and atlas.json (tokenizer/atlas.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import (
    BatchOpt,
    DeviceOpt,
    ModelOpt,
    OverwriteOpt,
    SeedOpt,
    claim_output,
    console,
    err_console,
    fail,
)
from tokenflow_cli.cli.eval_cmd import LimitOpt, eval_app
from tokenflow_cli.cli.models import check_image_source, image_subsets, resolve_tokenizer_for_cli

ImagesArg = Annotated[str | None, typer.Argument(
    help="Images (folder, glob, list); default: the built-in held-out shapes + photo crops.", show_default=False)]


@eval_app.command("atlas")
def atlas_cmd(
    images: ImagesArg = None,
    model: ModelOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for atlas.png, atlas.html and "
                                         "atlas.json (written beside it, swapped in whole).")] = Path("eval_atlas"),
    top: Annotated[int, typer.Option("--top", min=0, help="The N most used codes at the final scale.")] = 24,
    random: Annotated[int, typer.Option("--random", min=0, help="Plus M other used codes, a seeded sample.")] = 12,
    per_code: Annotated[int, typer.Option("--per-code", min=1, max=64, help="Example patches per code and "
                                          "assignment.")] = 8,
    limit: LimitOpt = 0,
    batch_size: BatchOpt = 16,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Codebook atlas at the final scale: per code, patches by shared index, semantic-nearest and pixel-nearest.
    Images are held in memory: use --limit on big folders."""
    if top + random < 1:
        raise fail("--top plus --random must be at least 1")
    check_image_source(images)
    claim = claim_output(output, "folder", "eval atlas", overwrite)  # before torch and the model load
    from tokenflow_cli.cli.progress import image_progress
    from tokenflow_cli.eval.atlas_render import render_html, render_png
    from tokenflow_cli.fileio import atomic_write_text
    from tokenflow_cli.tokenizer.atlas import AtlasOptions, collect_atlas
    from tokenflow_cli.tokenizer.encode import image_batches
    from tokenflow_cli.tokenizer.identity import tokenizer_id

    options = AtlasOptions(top=top, random=random, per_code=per_code, seed=seed)
    tok = resolve_tokenizer_for_cli(model, device)
    subsets = image_subsets(images, limit, tok.image_size)
    paths = [p for s in subsets for p in s.paths]
    failed: list[tuple[str, str]] = []

    def batches():
        for batch in image_batches(tok, paths, batch_size):
            failed.extend(batch.failures)
            if batch.images is not None:
                yield batch.images, batch.keys

    with image_progress(len(paths), "atlas") as update:
        try:
            atlas = collect_atlas(tok, batches(), options, progress=lambda n: update(n, len(failed), 0.0))
        except ValueError as err:  # every image unreadable
            raise fail(f"{err} ({len(failed)} unreadable)") from None
    claim.tmp.mkdir(parents=True, exist_ok=True)
    render_png(atlas.sheet, claim.tmp / "atlas.png", per_code)
    render_html(atlas.sheet, claim.tmp / "atlas.html")
    report = {"command": "tokenflow eval atlas", "model": tokenizer_id(tok),
              "data": {s.name: s.description for s in subsets}, "options": vars(options),
              "skipped": len(failed), **atlas.figures(),
              "warnings": ["the tokenizer is RANDOMLY INITIALISED"] if tok.random_init else []}
    atomic_write_text(claim.tmp / "atlas.json", json.dumps(report, indent=1))
    claim.commit()
    _print_atlas(report)
    for name in ("atlas.png", "atlas.html", "atlas.json"):
        console.print(f"wrote [bold]{output / name}[/]")


def _print_atlas(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"final scale {report['scale']}x{report['scale']}: {report['positions']} positions, "
                        f"{report['images']} images, {report['patch_px']} px patches (K = {report['codebook_size']})")
    for column in ("assignment", "codes used", "= shared", "pixel var. within codes", "semantic var. within codes"):
        table.add_column(column, justify="left" if column == "assignment" else "right")
    agree = report["agreement_with_shared"]
    for view, share in report["within_code_variance_share"].items():
        used = str(report["used"][view]) if view in report["used"] else "-"
        same = "100%" if view == "shared" else f"{agree[view]:.1%}" if view in agree else "-"
        label = "random (shared, shuffled)" if view == "random" else f"{view}-nearest" if view != "shared" else view
        table.add_row(label, used, same, f"{share['pixel']:.3f}", f"{share['semantic']:.3f}")
    console.print(table)
    top = ", ".join(f"#{c['index']} ({c['counts']['shared']})" for c in report["codes"][:8])
    console.print(f"most used: {top}; variance shares: share of the total left within codes (1 - R^2, lower = "
                  "purer)", highlight=False)
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}")
