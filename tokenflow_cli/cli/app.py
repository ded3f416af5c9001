"""Entry point: imports every command module (each registers itself on `app`)."""

from __future__ import annotations

from tokenflow_cli.cli import (
    commands_core,  # noqa: F401  (tokenize, reconstruct, doctor)
    convert_cmd,  # noqa: F401  (convert)
    eval_metrics_cmd,  # noqa: F401  (eval rfid|usage|teacher, prepare-fid)
    generate_cmd,  # noqa: F401  (generate, train-generator, eval geneval)
    llava_cmd,  # noqa: F401  (ask, finetune-llava)
    teacher_cmd,  # noqa: F401  (train-teacher)
    train_cmd,  # noqa: F401  (train-tokenizer)
)
from tokenflow_cli.cli.common import app
from tokenflow_cli.cli.data_cmd import data_app
from tokenflow_cli.cli.eval_cmd import eval_app

app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
