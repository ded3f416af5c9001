"""`tokenflow eval ...`: evaluation commands, each writing a JSON report and showing a table."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import DeviceOpt, console, fail

eval_app = typer.Typer(help="Evaluate tokenizers, generators and understanding models.", no_args_is_help=True)


@eval_app.command("vqa")
def vqa_cmd(
    data: Annotated[Path, typer.Option("--data", help="Questions: shapes vqa.jsonl or LLaVA JSON/JSONL.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Understanding model or run folder.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json.")] = Path("vqa_eval"),
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Override the model's tokenizer.")] = None,
    image_root: Annotated[str, typer.Option("--image-root", help="Folder image paths are relative to.")] = "",
    yes_no: Annotated[bool, typer.Option("--yes-no", help="Only yes/no questions, scored like MME.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="First N questions (0 = all).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Questions per batch.")] = 32,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer.")] = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Exact match after normalisation, per question type, plus MME-style yes/no acc and acc+."""
    from tokenflow_cli.checkpoint import atomic_write_text
    from tokenflow_cli.cli.llava_cmd import load_for_inference
    from tokenflow_cli.eval.vqa import answer_questions, is_yes_no, load_vqa_items, score_vqa

    try:
        items = load_vqa_items(data, image_root)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    items = [i for i in items if is_yes_no(i)] if yes_no else items
    items = items[:limit] if limit else items
    if not items:
        raise fail(f"{data}: no questions{' with yes/no answers' if yes_no else ''}")
    loaded = load_for_inference(model, tokenizer, device)
    with count_progress(len(items), "vqa") as update:
        predictions = answer_questions(
            loaded.model, loaded.features, items, batch_size, max_new_tokens, progress=update
        )
    report = score_vqa(items, predictions)
    report.update(
        model=str(loaded.model_dir),
        tokenizer=loaded.tokenizer_source,
        data=str(data),
        features=loaded.model.config.features,
        warnings=loaded.warnings,
    )
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2))
    rows = [
        json.dumps({"image": str(i.image), "question": i.question, "answer": i.answer, "type": i.type, "prediction": p})
        for i, p in zip(items, predictions, strict=True)
    ]
    atomic_write_text(output / "predictions.jsonl", "\n".join(rows) + "\n")
    _print_report(report)
    console.print(f"wrote [bold]{output / 'report.json'}[/]")


@contextlib.contextmanager
def count_progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A Rich bar advanced by update(n); silent when the console is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _print_report(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"VQA ({report['features']} features)")
    for column in ("type", "n", "accuracy"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for kind, row in report["per_type"].items():
        table.add_row(kind, str(row["n"]), f"{100 * row['accuracy']:.1f}")
    table.add_row("[bold]all", f"[bold]{report['n']}", f"[bold]{100 * report['accuracy']:.1f}")
    console.print(table)
    if "yes_no" in report:
        yn = report["yes_no"]
        console.print(
            f"yes/no (MME-style): acc {100 * yn['accuracy']:.1f}, acc+ {100 * yn['accuracy_plus']:.1f} "
            f"over {yn['images']} images, score {yn['mme_score']:.1f}, said yes {100 * yn['yes_ratio']:.0f}%"
        )
