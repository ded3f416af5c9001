"""Shared fixtures: offline, tiny recipe, CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENFLOW_HOME", os.path.join(os.path.dirname(__file__), ".tokenflow_home_unused"))
# tests never pick up the trained defaults shipped in tokenflow_cli/assets (test_defaults.py reads them)
os.environ["TOKENFLOW_ASSETS"] = os.path.join(os.path.dirname(__file__), ".no_assets")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's default models."""
    monkeypatch.setenv("TOKENFLOW_HOME", str(tmp_path_factory.getbasetemp() / "tokenflow_home"))
    monkeypatch.delenv("TOKENFLOW_TOKENIZER", raising=False)


@pytest.fixture
def tiny_recipe():
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe

    return load_recipe("tiny", TokenizerRecipe)


@pytest.fixture
def tiny_tokenizer(tiny_recipe):
    from tokenflow_cli.tokenizer.model import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer(tiny_recipe.model).eval()


@pytest.fixture
def cli_error(monkeypatch):
    """Check a CLI failure is one a user can act on: the given exit code (any non-zero one by
    default), exactly one `error:` line naming every given value or file, and no traceback.

    Usage: `line = cli_error(result, "offending-value", path, code=1)`; returns the error line.
    COLUMNS is widened so that Rich does not wrap (or fold a long path in) the error line.
    """
    monkeypatch.setenv("COLUMNS", "2000")

    def check(result, *names, code: int | None = None) -> str:
        output = result.output
        assert "Traceback" not in output, output
        # CliRunner swallows an uncaught exception (exit code 1, nothing printed): a clean
        # failure leaves SystemExit (typer.Exit / click usage error) and nothing else
        assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{output}"
        if code is None:
            assert result.exit_code != 0, output
        else:
            assert result.exit_code == code, output
        lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, output
        for name in names:
            assert str(name) in lines[0], f"{name!s} not named in {lines[0]!r}"
        return lines[0]

    return check
