"""Checkpoints: safetensors weights carrying their config, and training state.

Loading never executes code from a file: weights come from safetensors, training state from
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tokenflow_cli.config import to_dict
from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import WRITE_FAULTS, atomic_path, write_failed
from tokenflow_cli.version import __version__

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
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # the Rust writer reports a full disk as "... (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            if code and int(code.group(1)) in WRITE_FAULTS:
                raise write_failed(Path(path), OSError(int(code.group(1)), os.strerror(int(code.group(1))))) from err
            raise


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


class UnreadableCheckpointError(UserError, ValueError):
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


class WrongCheckpointKindError(UserError, ValueError):
    """A readable checkpoint of another kind than the command needs (a teacher given to tokenize)."""


KIND_USES = {  # what each checkpoint kind is for, named in a wrong-kind error
    "tokenizer": "tokenize / reconstruct / train-generator --tokenizer",
    "generator": "generate --model",
    "teacher": "a tokenizer recipe's semantic teacher",
    "llava-projector": "ask / eval vqa --model",
}


def require_kind(meta: dict[str, Any], path: Path, kind: str) -> dict[str, Any]:
    """The checkpoint's embedded config, after checking it is a `kind` checkpoint (one error line
    naming the file, what it is and what it is for); the config is then parsed like a recipe
    (`config.from_dict`) before any module is built."""
    fmt = str(meta.get("format", ""))
    found = fmt.split("/", 1)[1] if fmt.startswith("tokenflow-cli/") else None
    if found != kind:
        what = f"a {found} checkpoint (for {KIND_USES.get(found, 'another command')})" if found else (
            f"not a tokenflow-cli checkpoint (format {fmt or 'missing'!r}; `tokenflow convert` reads official ones)")
        raise WrongCheckpointKindError(f"{path} is {what}; a {kind} checkpoint is needed here")
    if not isinstance(meta.get("config"), dict):
        raise UnreadableCheckpointError(f"{path} carries no model config; it was not written by tokenflow-cli")
    return meta["config"]


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
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        sink = _RecordingWriter(raw)
        try:
            torch.save(state, sink)
        except RuntimeError as err:  # torch reports a short write as "unexpected pos"; say why it was short
            if sink.error is not None:
                raise write_failed(Path(path), sink.error) from err
            raise


class _RecordingWriter:
    """A file wrapper for torch.save that writes everything or keeps the OSError (a full disk, a
    file-size limit): torch turns a failed write into a bare RuntimeError."""

    def __init__(self, raw) -> None:
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data)
        try:
            while view.nbytes:
                view = view[self.raw.write(view):]
        except OSError as err:
            self.error = err
            raise
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def load_train_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
