"""`tokenflow train-tokenizer`: a thin layer over tokenflow_cli.train.tokenizer_step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenflow_cli.cli.common import DeviceOpt, RecipeArg, ResumeOpt, SetOpt, app, console, fail

RunDirOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Run folder (checkpoints, logs); default runs/<model.name>.")
]
OptionalSeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (default: train.seed).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: train.steps).")]


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: RunDirOpt = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "auto",
    seed: OptionalSeedOpt = None,
    steps: StepsOpt = None,
) -> None:
    """Train the tokenizer; live losses and codebook usage per scale. Runs under torchrun as DDP.

    Resumes automatically when the run folder holds a checkpoint (--no-resume starts over).
    """
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.data.images import ImageSourceError
    from tokenflow_cli.train.loop import NonFiniteLossError
    from tokenflow_cli.train.losses import MissingLpipsBackboneError
    from tokenflow_cli.train.tokenizer_step import train_tokenizer
    from tokenflow_cli.weights import MissingWeightsError

    extra = [*(overrides or []), *([f"train.seed={seed}"] if seed is not None else []),
             *([f"train.steps={steps}"] if steps is not None else [])]
    try:
        resolved = load_recipe(recipe, overrides=extra)
    except ConfigError as err:
        raise fail(str(err)) from None
    run_dir = output or Path("runs") / resolved.model.name
    try:
        result = train_tokenizer(resolved, run_dir, device=device, resume=resume)
    except (ConfigError, ImageSourceError, MissingLpipsBackboneError, MissingWeightsError) as err:
        raise fail(str(err)) from None
    except NonFiniteLossError as err:
        raise fail(str(err), code=3) from None
    finally:
        from tokenflow_cli.distributed import cleanup

        cleanup()
    if result.rank != 0:  # under torchrun rank 0 reports
        return
    ev = result.last_eval
    figures = f"PSNR {ev['psnr']:.2f} dB, codebook usage {ev['usage']:.1%} (held-out) " if "psnr" in ev else ""
    state = "stopped early at" if result.stopped_early else "finished"
    console.print(f"{state} step {result.step}: {figures}{result.images_per_s:.1f} images/s; "
                  f"weights [bold]{run_dir / 'model.safetensors'}[/]")
