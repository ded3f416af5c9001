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
