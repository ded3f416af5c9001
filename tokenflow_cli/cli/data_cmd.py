"""`tokenflow data shapes|natural`: write the offline datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tokenflow_cli.cli.common import OverwriteOpt, SeedOpt, claim_output, console, fail

data_app = typer.Typer(
    name="data",
    help="Write offline datasets: the synthetic shapes world and natural-image crops.",
    no_args_is_help=True,
)

CountOpt = Annotated[int, typer.Option("-n", "--num-images", help="Number of images to write.", min=1)]
SizeOpt = Annotated[int, typer.Option("--size", help="Image side in pixels.", min=16)]


@contextmanager
def _progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.advance(task, done)


def _summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


@data_app.command("shapes")
def shapes_cmd(
    *,
    num_images: CountOpt = 1000,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("data/shapes"),
    seed: SeedOpt = 0,
    size: SizeOpt = 64,
    llava: Annotated[bool, typer.Option("--llava/--no-llava", help="Also write llava.json conversations.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Render the synthetic shapes world: images, captions, VQA pairs and GenEval metadata."""
    from tokenflow_cli.data.shapes import render_shapes_world

    claim = claim_output(output, "folder", "data shapes", overwrite)
    with _progress_bar("shapes", num_images) as advance:
        summary = render_shapes_world(claim.tmp, num_images, seed=seed, size=size, llava=llava, progress=advance)
    claim.commit()
    rows = [
        ("images", f"{summary.n_images} x {size}px in {output / 'images'}"),
        ("GenEval tags", _counts(summary.tags)),
        ("VQA pairs", f"{summary.n_vqa} ({_counts(summary.vqa_types)})"),
        ("files", ", ".join(str(output / p.relative_to(claim.tmp)) for p in summary.files)),
    ]
    console.print(_summary_table(f"shapes world, seed {seed}", rows))


@data_app.command("natural")
def natural_cmd(
    *,
    num_images: CountOpt = 200,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("data/natural"),
    size: SizeOpt = 64,
    split: Annotated[str, typer.Option("--split", help="train | val (disjoint source photos).")] = "train",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Cut random crops from the photos scikit-image ships (offline natural images)."""
    from tokenflow_cli.data.natural import SPLITS, natural_crops

    if split not in SPLITS:
        raise fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    claim = claim_output(output, "folder", "data natural", overwrite)
    with _progress_bar(f"natural ({split})", num_images) as advance:
        try:
            summary = natural_crops(claim.tmp, num_images, size=size, seed=seed, split=split, progress=advance)
        except RuntimeError as err:
            raise fail(str(err)) from err
    claim.commit()
    rows = [
        ("images", f"{summary.n_images} x {size}px in {output / 'images'}"),
        ("photos used", _counts(summary.photos_used)),
        ("photos missing", ", ".join(summary.photos_missing) or "none"),
        ("files", ", ".join(str(output / p.relative_to(claim.tmp)) for p in summary.files)),
    ]
    console.print(_summary_table(f"natural crops, split {split}, seed {seed}", rows))
