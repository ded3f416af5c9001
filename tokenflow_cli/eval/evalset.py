"""The built-in evaluation set: held-out shapes and natural crops, generated on first use.

Both parts are deterministic functions of (seed, index), rendered straight at the evaluation
resolution into `$TOKENFLOW_HOME/eval-sets/`, and reused afterwards:

- shapes: the synthetic shapes world with seed `HELDOUT_SHAPES_SEED`, which no training recipe
  or `tokenflow data shapes` default uses (those start at seed 0);
- natural: crops of the scikit-image photos of the "val" split, whose source photos are
  disjoint from the "train" split's (data/natural.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenflow_cli.data.images import list_images
from tokenflow_cli.data.natural import VAL_PHOTOS, natural_crops
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.fileio import atomic_write_text
from tokenflow_cli.weights import tokenflow_home

HELDOUT_SHAPES_SEED = 10_007
NATURAL_SEED = 0
DEFAULT_PER_SUBSET = 64
DONE_MARKER = ".complete.json"


@dataclass
class EvalSubset:
    name: str  # "shapes", "natural", or "data" (--data)
    paths: list[Path]
    description: str  # where the images come from, for the report


def eval_sets_dir() -> Path:
    return tokenflow_home() / "eval-sets"


def _is_complete(folder: Path, params: dict) -> bool:
    marker = folder / DONE_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


def _mark_complete(folder: Path, params: dict) -> None:
    atomic_write_text(folder / DONE_MARKER, json.dumps(params))


def heldout_shapes(res: int, n: int, root: Path | None = None) -> EvalSubset:
    params = {"kind": "shapes", "seed": HELDOUT_SHAPES_SEED, "size": res, "n": n}
    folder = (root or eval_sets_dir()) / f"shapes-seed{HELDOUT_SHAPES_SEED}-{res}px-n{n}"
    if not _is_complete(folder, params):
        render_shapes_world(folder, n, seed=HELDOUT_SHAPES_SEED, size=res)
        _mark_complete(folder, params)
    paths = [folder / "images" / f"{i:06d}.png" for i in range(n)]
    return EvalSubset("shapes", paths, f"shapes world, seed {HELDOUT_SHAPES_SEED} (held out), {n} images at {res}px")


def natural_val_crops(res: int, n: int, root: Path | None = None) -> EvalSubset:
    params = {"kind": "natural", "seed": NATURAL_SEED, "split": "val", "size": res, "n": n}
    folder = (root or eval_sets_dir()) / f"natural-val-seed{NATURAL_SEED}-{res}px-n{n}"
    if not _is_complete(folder, params):
        natural_crops(folder, n, size=res, seed=NATURAL_SEED, split="val")
        _mark_complete(folder, params)
    paths = [folder / "images" / f"{i:06d}.png" for i in range(n)]
    return EvalSubset("natural", paths,
                      f"scikit-image val photos {', '.join(VAL_PHOTOS)}: {n} random crops at {res}px")


def builtin_eval_set(res: int, limit: int = 0, root: Path | None = None) -> list[EvalSubset]:
    """Shapes and natural crops; `limit` is the total, split evenly (default 64 + 64)."""
    total = limit or 2 * DEFAULT_PER_SUBSET
    n_shapes, n_natural = (total + 1) // 2, total // 2
    subsets = [heldout_shapes(res, n_shapes, root)]
    if n_natural:
        subsets.append(natural_val_crops(res, n_natural, root))
    return subsets


def folder_subset(source: str | Path, limit: int = 0) -> EvalSubset:
    """A user's images (folder, glob, list): one subset, first `limit` files in sorted order."""

    paths = list_images(source)
    paths = paths[:limit] if limit else paths
    return EvalSubset("data", paths, f"{source} ({len(paths)} files)")
