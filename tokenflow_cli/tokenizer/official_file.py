"""Reading an official TokenFlow training checkpoint (`.pt`) safely.

The official files are pickles: `{"model": state_dict, "ema": ..., "args": argparse.Namespace,
"steps": int, "optimizer": ..., ...}`. They are read with `torch.load(weights_only=True)` with
exactly one extra class allowed (`argparse.Namespace`), so no pickled code ever runs.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from tokenflow_cli.errors import UserError

ENTRY_ORDER = ("ema", "model", "state_dict")  # the official loaders' order


class ConversionError(UserError, ValueError):
    """The file cannot become one of our checkpoints; the message lists every problem."""


def _torch_load(path: Path) -> object:
    """weights_only load allowing `argparse.Namespace` only; memory-mapped when possible."""
    use_mmap = zipfile.is_zipfile(path)  # the new torch.save format; legacy files cannot mmap
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = found.group(1) if found else str(err).strip().splitlines()[-1]
        raise ConversionError(
            f"{path}: refused to unpickle {what}: only tensors, plain containers and argparse.Namespace "
            "are accepted (the file is never executed)"
        ) from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def pick_state_dict(obj: object, source: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """`ema` if present, else `model`, else `state_dict`, else the object itself if it is a bare
    state dict. Returns (state dict, entry used, other top-level entries)."""
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source}: expected a dict at top level, found {type(obj).__name__}")
    for entry in ENTRY_ORDER:
        if _is_state_dict(obj.get(entry)):
            return dict(obj[entry]), entry, sorted(str(k) for k in obj if k != entry)
    if _is_state_dict(obj):
        return dict(obj), "bare state dict", []
    raise ConversionError(
        f"{source}: no state dict found under {list(ENTRY_ORDER)} and the file is not a bare state dict "
        f"(top-level entries: {sorted(str(k) for k in obj)})"
    )


def strip_module_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop DistributedDataParallel's leading `module.` (possibly repeated) from every key."""
    out, stripped = {}, 0
    for key, value in sd.items():
        new = key
        while new.startswith("module."):
            new = new[len("module.") :]
        stripped += new != key
        if new in out:
            raise ConversionError(f"both {key!r} and another key become {new!r} after stripping `module.`")
        out[new] = value
    return out, stripped


def load_official(path: str | Path) -> tuple[dict[str, torch.Tensor], str, list[str], int | None]:
    """(state dict with `module.` stripped, entry used, other entries, training steps or None)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"official checkpoint not found: {path}")
    obj = _torch_load(path)
    sd, entry, others = pick_state_dict(obj, str(path))
    steps = obj.get("steps") if isinstance(obj, Mapping) else None
    return sd, entry, others, steps if isinstance(steps, int) else None
