"""Entry point: imports every command module (each registers itself on `app`)."""

from __future__ import annotations

from tokenflow_cli.cli import commands_core  # noqa: F401  (tokenize, reconstruct, doctor)
from tokenflow_cli.cli.common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
