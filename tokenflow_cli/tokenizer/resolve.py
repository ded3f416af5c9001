"""Which tokenizer a command uses: `--model` (a checkpoint, run folder, built-in name or hub id,
or a recipe built untrained), else the default tokenizer (weights.DEFAULT_TOKENIZER), else a
clearly labelled random-init stand-in, so every command runs on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenflow_cli.config import list_recipes, load_recipe
from tokenflow_cli.pretrained import HUB_ID, Provenance
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.weights import DEFAULT_TOKENIZER

STAND_IN_RECIPE = "tiny"
STAND_IN_SOURCE = "tiny recipe, RANDOM INIT (no trained default found: run `make demo`)"


def _is_recipe(name: str) -> bool:
    return Path(name).suffix in (".yaml", ".yml") or name in list_recipes()


def resolve_tokenizer(model: str | None, device: torch.device | str = "cpu") -> TokenFlowTokenizer:
    """`model` (see the module docstring), else the default tokenizer, else the stand-in (the
    tiny recipe with seed-0 weights: the same stand-in every time, so its codes decode again)."""
    if model:
        path = Path(model)
        if path.is_dir() or path.suffix == ".safetensors" or DEFAULT_TOKENIZER.builtin(model) is not None:
            return TokenFlowTokenizer.from_pretrained(path if path.exists() else model, device=device)
        if HUB_ID.fullmatch(model) and not _is_recipe(model):
            return TokenFlowTokenizer.from_pretrained(model, device=device)
        return random_tokenizer(model, device, source=f"recipe {model} (random init)")
    if DEFAULT_TOKENIZER.find() is not None:
        return TokenFlowTokenizer.from_pretrained(None, device=device)
    return random_tokenizer(STAND_IN_RECIPE, device, source=STAND_IN_SOURCE)


def random_tokenizer(recipe: str, device: torch.device | str = "cpu", seed: int = 0,
                     source: str | None = None) -> TokenFlowTokenizer:
    """A recipe's tokenizer with weights drawn from `seed` (the global RNG is left as it was)."""
    cfg = load_recipe(recipe, TokenizerRecipe).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = TokenFlowTokenizer(cfg, provenance=Provenance(source or f"recipe {recipe} (random init)", True))
    return tok.to(device).eval()
