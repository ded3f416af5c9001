"""The one way a training command runs: load the recipe (its schema checked against the
command's kind), pick the run folder, train, leave the process group, and turn a user error into
one `error:` line with a documented exit code. Only rank 0 reports under torchrun.

Exit codes: 1 for a user error (bad recipe or value, missing file or weights, unreadable data),
3 when training stopped on a non-finite loss (its last good checkpoint is kept), 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM) when a signal stopped it: the step's checkpoint is kept,
nothing is published, and the same command resumes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenflow_cli.cli.common import claim_output, fail
from tokenflow_cli.errors import EXIT_NON_FINITE_LOSS, EXIT_USER_ERROR, UserError, exit_code_for_signal


@dataclass
class TrainingRun:
    recipe: Any  # the parsed recipe dataclass
    run_dir: Path
    result: Any  # what the stage's train function returned


def run_training(
    recipe_name: str,
    recipe_class: type,
    overrides: list[str],
    output: Path | None,
    default_run_name: Callable[[Any], str],
    train_fn: Callable[[Any, Path], Any],
    validate: Callable[[Any], None] | None = None,
) -> TrainingRun | None:
    """Run `train_fn(recipe, run_dir)`; None on ranks other than 0. A run stopped by a signal
    ends here with one `error:` line and exit code 128 + the signal (`_exit_if_interrupted`).
    `train_fn` imports its (torch-heavy) stage itself, so the recipe and the run folder are
    checked without torch's start-up."""
    from tokenflow_cli.config import ConfigError, load_recipe

    try:
        recipe = load_recipe(recipe_name, recipe_class, overrides)
        if validate is not None:
            validate(recipe)
    except ConfigError as err:
        raise fail(str(err), EXIT_USER_ERROR) from None
    run_dir = output or Path("runs") / default_run_name(recipe)
    claim = claim_output(run_dir, "run", "train")  # one writer per run folder; checked before any model loads
    # torch comes in from here on (`train_fn` imports its stage): a bad recipe or run folder fails without it
    from tokenflow_cli.distributed import cleanup
    from tokenflow_cli.train.stage import NonFiniteLossError

    try:
        result = train_fn(recipe, run_dir)
    except NonFiniteLossError as err:
        raise fail(str(err), EXIT_NON_FINITE_LOSS) from None
    except (UserError, FileNotFoundError, ValueError) as err:  # bad config or data, missing weights, full disk
        raise fail(str(err), EXIT_USER_ERROR) from None
    finally:
        cleanup()
    claim.commit()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    _exit_if_interrupted(result, run_dir)
    return TrainingRun(recipe, run_dir, result)


def _exit_if_interrupted(result: Any, run_dir: Path) -> None:
    """A run stopped by SIGINT/SIGTERM is not a finished run: say where its checkpoint is and
    exit 128 + the signal, before the command could report (or publish) anything."""
    from tokenflow_cli.train.stage import TrainResult

    parts = result if isinstance(result, tuple) else (result,)  # finetune-llava: (TrainResult, model folder)
    train_result = next((p for p in parts if isinstance(p, TrainResult)), None)
    if train_result is None or train_result.stop_signal is None:
        return
    name = signal.Signals(train_result.stop_signal).name
    kept = f"checkpoint {train_result.checkpoint}" if train_result.checkpoint else "no checkpoint yet"
    raise fail(f"interrupted by {name} at step {train_result.step}; {kept} kept in {run_dir}, nothing published; "
               "run the same command to resume", exit_code_for_signal(train_result.stop_signal))
