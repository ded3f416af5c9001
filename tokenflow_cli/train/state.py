"""Run-folder checkpoints that are never half written, and RNG capture for exact resume.

Layout of a run folder:

    RUN_DIR/recipe.yaml                       resolved recipe
    RUN_DIR/model.safetensors                 latest weights (what `--model RUN_DIR` loads)
    RUN_DIR/checkpoints/step-00001000/        one complete checkpoint:
        model.safetensors                       weights + config metadata
        train_state.pt                          optimizers, step, RNG, sampler position, stage extras
        ema.safetensors                         EMA weights (when train.ema_decay > 0)

A checkpoint folder is written under a temporary name and renamed into place, so it exists
complete or not at all; only then is RUN_DIR/model.safetensors swapped (atomically) to point at
it. A run killed at any moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenflow_cli.checkpoint import STATE_NAME, WEIGHTS_NAME

CHECKPOINTS = "checkpoints"
EMA_NAME = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(child.name)
        if match and (child / WEIGHTS_NAME).is_file() and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Temporary folders a killed run left behind."""
    root = Path(run_dir) / CHECKPOINTS
    for child in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(child, ignore_errors=True)


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Call `write(folder)` on a temporary folder, rename it to step-N, publish its weights as
    RUN_DIR/model.safetensors, and keep the newest `keep` checkpoints."""
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the end of a resumed, already finished run)
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for name in (WEIGHTS_NAME, EMA_NAME):
        if (final / name).is_file():
            _publish(final / name, run_dir / name)
    for _, folder in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def _publish(source: Path, target: Path) -> None:
    """Atomically make `target` a copy of `source` (a hard link when the filesystem allows)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clear_run(run_dir: Path, names: tuple[str, ...]) -> None:
    """A fresh (`--no-resume`) start: drop old checkpoints and logs so nothing resumes from them."""
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)
    for name in (WEIGHTS_NAME, EMA_NAME, *names):
        (Path(run_dir) / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class preserved_rng:
    """Run a block (evaluation, logging) without moving any random generator."""

    def __enter__(self) -> None:
        self.state = capture_rng()

    def __exit__(self, *exc: object) -> None:
        restore_rng(self.state)
