"""Checkpoints: safetensors weights carrying their config, and training state.

Loading never executes code from a file: weights come from safetensors, training state from
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tokenflow_cli import __version__
from tokenflow_cli.config import to_dict
from tokenflow_cli.fileio import atomic_path

WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"


def save_weights(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    config: dict | None = None,
    kind: str = "tokenizer",
    extra: dict[str, str] | None = None,
) -> None:
    """Write tensors as safetensors with `{"format", "config", "version"}` metadata, atomically."""
    metadata = {"format": f"tokenflow-cli/{kind}", "version": __version__}
    if config is not None:
        metadata["config"] = json.dumps(config)
    metadata.update(extra or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _dedupe_shared(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing storage; store clones of aliases."""
    seen: dict[int, str] = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel() > 0:
            tensors[key] = value.clone()
        else:
            seen[ptr] = key


def save_model(module: torch.nn.Module, path: Path, config: Any, kind: str = "tokenizer") -> None:
    save_weights(module.state_dict(), path, to_dict(config), kind)


class UnreadableCheckpointError(ValueError):
    """A weights file that is truncated, corrupt or not safetensors at all."""


def read_metadata(path: Path) -> dict[str, Any]:
    """Metadata of a safetensors file; `config` decoded from JSON."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        if "config" in meta:
            meta["config"] = json.loads(meta["config"])
    except (SafetensorError, json.JSONDecodeError) as err:
        raise UnreadableCheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None
    return meta


def load_state(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    meta = read_metadata(path)  # first: a truncated file fails here with a clear message
    try:
        return load_file(str(path), device=str(device)), meta
    except SafetensorError as err:
        raise UnreadableCheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None


def resolve_weights_path(path_or_dir: str | Path) -> Path:
    """A `.safetensors` file, or a run folder holding `model.safetensors`."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path_or_dir}: expected a .safetensors file or a run folder with {WEIGHTS_NAME}"
        )
    return path


def save_train_state(state: dict[str, Any], path: Path) -> None:
    """Optimizer/step/RNG state; plain tensors and containers only (weights_only-loadable)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
