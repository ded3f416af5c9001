"""The one way a training command runs: load the recipe (its schema checked against the
command's kind), pick the run folder, train, leave the process group, and turn a user error into
one `error:` line with a documented exit code. Only rank 0 reports under torchrun.

Exit codes: 1 for a user error (bad recipe or value, missing file or weights, unreadable data),
3 when training stopped on a non-finite loss (its last good checkpoint is kept).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenflow_cli.cli.common import fail
from tokenflow_cli.errors import EXIT_NON_FINITE_LOSS, EXIT_USER_ERROR, UserError


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
    """Run `train_fn(recipe, run_dir)`; None on ranks other than 0."""
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.distributed import cleanup
    from tokenflow_cli.train.stage import NonFiniteLossError

    try:
        recipe = load_recipe(recipe_name, recipe_class, overrides)
        if validate is not None:
            validate(recipe)
    except ConfigError as err:
        raise fail(str(err), EXIT_USER_ERROR) from None
    run_dir = output or Path("runs") / default_run_name(recipe)
    try:
        result = train_fn(recipe, run_dir)
    except NonFiniteLossError as err:
        raise fail(str(err), EXIT_NON_FINITE_LOSS) from None
    except (UserError, FileNotFoundError, ValueError) as err:  # bad config or data, missing weights, full disk
        raise fail(str(err), EXIT_USER_ERROR) from None
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return TrainingRun(recipe, run_dir, result)
