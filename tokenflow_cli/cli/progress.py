"""Rich progress bars for image jobs: images/s, failures, running codebook usage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tokenflow_cli.cli.common import console


@contextlib.contextmanager
def image_progress(total: int, label: str) -> Iterator[Callable[[int, int, float], None]]:
    """Yields update(done, failed, usage_share). total=0 means unknown (from a codes file)."""
    start = time.perf_counter()
    columns = [
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TextColumn("usage {task.fields[usage]:.1%}"),
        TextColumn("[yellow]{task.fields[failed]} skipped"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=total or None, rate=0.0, usage=0.0, failed=0)

        def update(done: int, failed: int, usage: float) -> None:
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=done, rate=done / elapsed, usage=usage, failed=failed)

        yield update


@contextlib.contextmanager
def count_progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A Rich bar advanced by update(n); silent when the console is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
