"""Copy the models `scripts/build_defaults.sh` trained into tokenflow_cli/assets/, as the defaults
`tokenize`, `generate` and `ask` use without --model (weights.DEFAULT_*).

    python scripts/ship_defaults.py build/defaults

Only what loading needs is copied (no checkpoints, logs or samples). The understanding model
gets its own copy of the image tokenizer, named in its llava.json, like a converted release, so
the folder is self-contained; so does the generator (its image_tokenizer.safetensors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenflow_cli.fileio import atomic_path, file_sha256, replace_folder  # noqa: E402
from tokenflow_cli.weights import ASSETS_DIR, DEFAULT_GENERATOR, DEFAULT_LLAVA, DEFAULT_TOKENIZER  # noqa: E402

GENERATOR_FILES = ("model.safetensors", "generator.json", "recipe.yaml", "image_tokenizer.safetensors",
                   "text_tokenizer")
IMAGE_TOKENIZER = "image_tokenizer.safetensors"


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def ship(build: Path, assets: Path = ASSETS_DIR) -> list[str]:
    lines = []
    tokenizer = build / "tokenizer" / "model.safetensors"
    target = assets / DEFAULT_TOKENIZER.asset
    with atomic_path(target) as tmp:
        shutil.copyfile(tokenizer, tmp)
    lines.append(f"tokenizer {tokenizer} -> {target}")

    staged = assets / (DEFAULT_GENERATOR.asset + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for name in GENERATOR_FILES:
        _copy(build / "generator" / name, staged / name)
    replace_folder(staged, assets / DEFAULT_GENERATOR.asset)
    lines.append(f"generator {build / 'generator'} -> {assets / DEFAULT_GENERATOR.asset}")

    final = build / "llava" / "final"
    staged = assets / (DEFAULT_LLAVA.asset + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(final, staged)
    info = json.loads((staged / "llava.json").read_text())
    source = Path(info["tokenizer_source"])
    if file_sha256(source) != info.get("tokenizer_sha256"):
        raise SystemExit(f"{source} is not the tokenizer {final} was trained on (sha256 differs)")
    shutil.copyfile(source, staged / IMAGE_TOKENIZER)
    info["tokenizer_source"] = IMAGE_TOKENIZER  # read relative to the model folder
    info["config"]["tokenizer"] = IMAGE_TOKENIZER
    (staged / "llava.json").write_text(json.dumps(info, indent=1) + "\n")
    replace_folder(staged, assets / DEFAULT_LLAVA.asset)
    lines.append(f"understanding model {final} -> {assets / DEFAULT_LLAVA.asset}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="the folder build_defaults.sh wrote")
    args = parser.parse_args()
    for line in ship(args.build):
        print(line)


if __name__ == "__main__":
    main()
