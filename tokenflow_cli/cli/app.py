"""Entry point: imports every command module (each registers itself on `app`) and turns a user
error that no command caught into one `error:` line (docs: README "Exit codes")."""

from __future__ import annotations

import sys

import typer

from tokenflow_cli.cli import (
    atlas_cmd,  # noqa: F401  (eval atlas)
    convert_cmd,  # noqa: F401  (convert)
    doctor,  # noqa: F401  (doctor)
    eval_tokenizer_cmd,  # noqa: F401  (eval rfid, eval usage, prepare-fid)
    generation_cmd,  # noqa: F401  (generate, train-generator)
    teacher_cmd,  # noqa: F401  (train-teacher)
    tokenizer_cmd,  # noqa: F401  (tokenize, reconstruct, train-tokenizer, codes)
    understanding_cmd,  # noqa: F401  (ask, finetune-llava)
)
from tokenflow_cli.cli.codes_cmd import codes_app
from tokenflow_cli.cli.common import CliState, app, debug_from_env, fit_consoles_to_output, report_error
from tokenflow_cli.cli.data_cmd import data_app
from tokenflow_cli.cli.eval_cmd import eval_app  # eval vqa|teacher|geneval (+ rfid|usage)
from tokenflow_cli.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

# click's exception classes as this Typer raises them (recent Typer vendors its own click)
UsageError = typer.BadParameter.__base__
ClickException = UsageError.__base__

app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(codes_app, name="codes")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A `UserError` (or a missing file) that reaches here prints one line and exits
    1; `--debug` or TOKENFLOW_DEBUG=1 shows its traceback. Any other exception is a bug and
    keeps its traceback."""
    CliState.debug = debug_from_env()  # until the global options are parsed
    fit_consoles_to_output()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="tokenflow", standalone_mode=False)
    except typer.Abort:
        report_error("interrupted")
        code = EXIT_INTERRUPTED
    except UsageError as err:  # a bad command line or option value: exit 2
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        report_error(f"{err.format_message()}{where}")
        code = err.exit_code
    except ClickException as err:
        err.show()
        code = err.exit_code
    except (UserError, FileNotFoundError) as err:
        if CliState.debug:
            raise
        report_error(err)
        code = EXIT_USER_ERROR
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
