"""What a training run shows and writes: a Rich live panel, and the same figures in
RUN_DIR/metrics.jsonl (every row, train and eval), metrics.csv (train) and eval.csv.

Row keys the panel understands: `step`, `lr`, `images_per_s`, `eta_s`, `loss` and other losses,
`usage` / `usage@S` (share of codes hit in the rolling window, overall / at scale side S) and
`ppl` / `ppl@S` (code perplexity). Anything else is shown with the losses.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokenflow_cli.fileio import atomic_write_text

LOG_FILES = ("metrics.jsonl", "metrics.csv", "eval.csv")
_NOT_LOSSES = {"step", "lr", "images_per_s", "eta_s", "time_s", "split", "epoch", "grad_norm"}


def _is_usage(key: str) -> bool:
    return key in ("usage", "ppl") or key.startswith(("usage@", "ppl@"))


class MetricsLog:
    """Append-only JSONL plus CSV views. CSV columns grow when a new key first appears (the GAN
    losses at their start step, say): the file is then rewritten once with the wider header."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.is_file():
            # rows logged after the checkpoint we resume from are replayed by the resumed run
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        for split in ("train", "eval"):
            self._write_csv(split)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        split = row.get("split", "train")
        path = self._csv_path(split)
        columns = self._columns(split)
        if path.is_file() and self._header(path) == columns:
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, columns).writerow(row)
        else:
            self._write_csv(split)

    def _csv_path(self, split: str) -> Path:
        return self.run_dir / ("metrics.csv" if split == "train" else f"{split}.csv")

    def _columns(self, split: str) -> list[str]:
        columns: dict[str, None] = {}
        for row in self.rows:
            if row.get("split", "train") == split:
                columns.update(dict.fromkeys(row))
        return list(columns)

    @staticmethod
    def _header(path: Path) -> list[str]:
        with open(path, newline="") as fh:
            return next(csv.reader(fh), [])

    def _write_csv(self, split: str) -> None:
        rows = [r for r in self.rows if r.get("split", "train") == split]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self._columns(split))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self._csv_path(split), buffer.getvalue() if rows else "")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class TrainProgress:
    """Rank-0 reporter: writes every row to the log and shows it.

    On a terminal, a Rich live panel (step, images/s, ETA, losses, codebook usage per scale and
    perplexity); elsewhere one line per logged row. `live=False` keeps the log and prints
    nothing (tests, library callers).
    """

    def __init__(self, run_dir: Path, total_steps: int, resume_step: int | None = None,
                 console: Console | None = None, live: bool | None = True) -> None:
        self.log = MetricsLog(run_dir, resume_step)
        self.total = total_steps
        self.console = console or Console(stderr=True)
        if not self.console.is_terminal:  # a log file or pipe: one line per row, never wrapped
            self.console.soft_wrap = True
        self.quiet = live is False
        self.live = None
        if not self.quiet and self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.started = time.perf_counter()

    def train_row(self, row: dict[str, Any]) -> None:
        self.log.append({**row, "split": "train"})
        self.last_train = row
        self._show(row)

    def eval_row(self, row: dict[str, Any]) -> None:
        self.log.append({**row, "split": "eval"})
        self.last_eval = row
        self._show(row, prefix="eval ")

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def _show(self, row: dict[str, Any], prefix: str = "") -> None:
        if self.quiet:
            return
        if self.live is not None:
            self.live.update(self._panel())
        else:
            keys = [k for k in row if k not in ("split", "time_s")]
            self.console.print(prefix + "  ".join(f"{k} {_fmt(row[k])}" for k in keys), highlight=False)

    def _panel(self) -> Group:
        row = self.last_train
        step = row.get("step", 0)
        head = Text.assemble(
            ("step ", "bold"), f"{step}/{self.total}  ",
            ("images/s ", "bold"), f"{row.get('images_per_s', 0.0):.1f}  ",
            ("ETA ", "bold"), _duration(row.get("eta_s", 0.0)) + "  ",
            ("elapsed ", "bold"), _duration(time.perf_counter() - self.started) + "  ",
            ("lr ", "bold"), f"{row.get('lr', 0.0):.3g}",
        )
        parts: list[Any] = [head, self._losses(row)]
        usage = self._usage(row)
        if usage is not None:
            parts.append(usage)
        if self.last_eval:
            parts.append(Text("eval  " + "  ".join(f"{k} {_fmt(v)}" for k, v in self.last_eval.items()
                                                    if k not in ("split", "time_s")), style="cyan"))
        return Group(*parts)

    @staticmethod
    def _losses(row: dict[str, Any]) -> Table:
        keys = [k for k in row if k not in _NOT_LOSSES and not _is_usage(k)]
        table = Table(box=None, show_edge=False, pad_edge=False)
        for key in keys:
            table.add_column(key, justify="right", style="bold" if key == "loss" else None)
        table.add_row(*(_fmt(row[k]) for k in keys))
        return table

    @staticmethod
    def _usage(row: dict[str, Any]) -> Table | None:
        scales = [k.split("@", 1)[1] for k in row if k.startswith("usage@")]
        if not scales and "usage" not in row:
            return None
        table = Table(box=None, show_edge=False, pad_edge=False, title_justify="left")
        table.add_column("codes", style="bold")
        for s in scales:
            table.add_column(f"{s}x{s}", justify="right")
        table.add_column("all", justify="right", style="bold")
        table.add_row("usage", *(f"{row[f'usage@{s}']:.0%}" for s in scales), f"{row.get('usage', 0.0):.1%}")
        if any(f"ppl@{s}" in row for s in scales):
            table.add_row("perplexity", *(f"{row.get(f'ppl@{s}', 0.0):.0f}" for s in scales),
                          f"{row.get('ppl', 0.0):.0f}")
        return table

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._panel())
            self.live.stop()
            self.live = None
