"""`tokenflow train-teacher`: a thin layer over tokenflow_cli.teacher.stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import DeviceOpt, RecipeArg, ResumeOpt, SetOpt, app, console, fail
from tokenflow_cli.cli.training import run_training


@app.command("train-teacher")
def train_teacher_cmd(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (runs/<model.name>).")] = None,
    resume: ResumeOpt = True,
    publish: Annotated[bool, typer.Option(
        "--publish/--no-publish", help="After a FINISHED run, copy its weights to the default teacher location "
        "(see `tokenflow doctor`); an interrupted run publishes nothing. Rerunning a finished run with --publish "
        "publishes it without training.",
    )] = False,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (default: train.steps).")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a small CLIP contrastively on captioned images (offline teacher for the semantic branch)."""
    from tokenflow_cli.teacher.config import TeacherRecipe

    def train(r, run_dir: Path):
        from tokenflow_cli.teacher.stage import train_teacher

        return train_teacher(r, run_dir, device=device, resume=resume)

    extra = [*(overrides or []), *([f"train.steps={steps}"] if steps is not None else [])]
    run = run_training(recipe, TeacherRecipe, extra, output, lambda r: r.model.name, train)
    if run is None:
        return
    from tokenflow_cli.teacher.stage import UnfinishedRunError, publish_teacher
    from tokenflow_cli.weights import TINY_TEACHER, default_location

    result, run_dir = run.result, run.run_dir
    ev = result.last_eval
    figures = f"held-out i2t top-1 {ev['i2t_top1']:.1%}, val loss {ev['val_loss']:.3f}; " if "i2t_top1" in ev else ""
    console.print(f"step {result.step}: {figures}weights [bold]{run_dir / 'model.safetensors'}[/]")
    if not publish:
        console.print(f"not published as the default teacher (use it with --model {run_dir}, or rerun this "
                      "command with --publish)")
        return
    try:
        target = publish_teacher(run_dir, default_location(TINY_TEACHER), run.recipe.train.steps)
    except UnfinishedRunError as err:
        raise fail(str(err)) from None
    console.print(f"published as the default teacher: [bold]{target}[/] "
                  "(use --set model.teacher.pretrained=teacher-tiny in tokenizer recipes)")
