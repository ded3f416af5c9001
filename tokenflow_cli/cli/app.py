"""Entry point: imports every command module (each registers itself on `app`)."""

from __future__ import annotations

from tokenflow_cli.cli import (
    convert_cmd,  # noqa: F401  (convert)
    doctor,  # noqa: F401  (doctor)
    generation_cmd,  # noqa: F401  (generate, train-generator)
    teacher_cmd,  # noqa: F401  (train-teacher)
    tokenizer_cmd,  # noqa: F401  (tokenize, reconstruct, train-tokenizer)
    understanding_cmd,  # noqa: F401  (ask, finetune-llava)
)
from tokenflow_cli.cli.common import app
from tokenflow_cli.cli.data_cmd import data_app
from tokenflow_cli.cli.eval_cmd import eval_app  # eval rfid|usage|teacher|vqa|geneval, prepare-fid

app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
