"""Checkpoints: safetensors weights carrying their config, training state, atomic writes.

Loading never executes code from a file: weights come from safetensors, training state from
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from tokenflow_cli import __version__

WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"


def _atomic_target(path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return path, Path(tmp)


def _default_mode() -> int:
    """What open() would give a new file (0666 less the umask); mkstemp makes files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path, tmp = _atomic_target(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class atomic_path:
    """`with atomic_path(final) as tmp: write(tmp)` -> renamed onto `final` only on success."""

    def __init__(self, path: Path, suffix: str = "") -> None:
        self.path = Path(path)
        self.suffix = suffix or self.path.suffix

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.suffix}", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                _commit(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


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
    from tokenflow_cli.config import to_dict

    save_weights(module.state_dict(), path, to_dict(config), kind)


def read_metadata(path: Path) -> dict[str, Any]:
    """Metadata of a safetensors file; `config` decoded from JSON."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if "config" in meta:
        meta["config"] = json.loads(meta["config"])
    return meta


def load_state(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_file(str(path), device=str(device)), read_metadata(path)


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
