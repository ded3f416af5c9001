"""Streaming reader for Hugging Face hub-style model folders, offline.

A hub folder, as a user has it after `huggingface-cli download` or `git clone`, holds
`config.json`, the weights as one file or as shards listed by an index
(`model.safetensors.index.json` / `pytorch_model.bin.index.json`, whose `weight_map` maps every
tensor name to its shard), and the text tokenizer's files. Converters read it shard by shard so
that peak memory is about one shard, never the whole model, and keep the stored dtype.

`.bin` shards are read with `torch.load(weights_only=True, mmap=True)`: no code from the file
runs, and the tensors are paged in from disk as they are used. Every problem is one
`HubFolderError` line naming the file (a missing shard, a tensor the index lists that its shard
lacks, a corrupt or unsafe file).

    folder = open_hub_folder("Tokenflow-llava-qwen2.5-14B-finetuning")
    shapes = tensor_shapes(folder)               # every name -> (shape, dtype), headers only
    for name, tensor in iter_tensors(folder):   # shard by shard, stored dtype
        ...
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from tokenflow_cli.checkpoint import UnreadableCheckpointError

CONFIG_NAME = "config.json"
# weight layouts in the order they are preferred: (index file, single file)
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# text tokenizer files a hub folder may hold (fast, slow BPE, sentencepiece, and their configs)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


# safetensors header dtype -> torch dtype name
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class HubFolderError(UnreadableCheckpointError):
    """A hub-style folder that cannot be read: missing or corrupt config, index or shard."""


@dataclass(frozen=True)
class HubFolder:
    root: Path  # the folder
    config: dict[str, Any]  # config.json, parsed
    shards: tuple[Path, ...]  # weight files in reading order (one when not sharded)
    weight_map: dict[str, str] | None  # tensor name -> shard file name, from the index (None: no index)
    tokenizer_files: dict[str, Path]  # file name -> path, for the TOKENIZER_FILES present

    @property
    def format(self) -> str:
        """'safetensors' or 'bin'."""
        return "safetensors" if self.shards[0].suffix == ".safetensors" else "bin"

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HubFolderError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubFolderError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise HubFolderError(f"{path} does not hold a JSON object")
    return data


def open_hub_folder(path: str | Path) -> HubFolder:
    """Read config.json and the weight index (or find the single weights file); opens no shard."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HubFolderError(f"{root} is not a folder (expected a hub-style model folder with {CONFIG_NAME})")
    config = read_json(root / CONFIG_NAME)
    shards, weight_map = _find_weights(root)
    tokenizer_files = {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}
    return HubFolder(root, config, shards, weight_map, tokenizer_files)


def _find_weights(root: Path) -> tuple[tuple[Path, ...], dict[str, str] | None]:
    for index_name, single_name in WEIGHT_LAYOUTS:
        index_path = root / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HubFolderError(f"{index_path} has no weight_map")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise HubFolderError(
                    f"{root / missing[0]} not found: {index_path.name} lists it "
                    f"({len(missing)} of {len(names)} shards missing)"
                )
            return tuple(root / n for n in names), dict(weight_map)
        if (root / single_name).is_file():
            return (root / single_name,), None
    expected = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
    raise HubFolderError(f"{root} holds no weights: expected one of {expected}")


def iter_shards(folder: HubFolder) -> Iterator[tuple[Path, Iterator[tuple[str, torch.Tensor]]]]:
    """(shard path, its tensors) one shard at a time; a shard is checked against the index
    before any of its tensors is given out."""
    for shard in folder.shards:
        names, tensors = _open_shard(shard)
        if folder.weight_map is not None:
            _check_against_index(folder, shard, names)
        yield shard, tensors


def iter_tensors(folder: HubFolder) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the folder, shard by shard, in the stored dtype, on the CPU."""
    for _, tensors in iter_shards(folder):
        yield from tensors


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "bfloat16", "float32", ...
    shard: str  # file name of the shard holding it


def tensor_shapes(folder: HubFolder) -> dict[str, TensorInfo]:
    """Name -> shape, dtype and shard of every tensor, without reading tensor data (safetensors
    headers; `.bin` shards are memory-mapped), checked against the index like `iter_shards`."""
    infos: dict[str, TensorInfo] = {}
    for shard in folder.shards:
        shard_infos = _shard_infos(shard)
        if folder.weight_map is not None:
            _check_against_index(folder, shard, list(shard_infos))
        infos.update(shard_infos)
    return infos


def _shard_infos(shard: Path) -> dict[str, TensorInfo]:
    if shard.suffix != ".safetensors":
        return {
            name: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), shard.name)
            for name, t in _load_bin(shard).items()
        }
    try:
        with safe_open(str(shard), framework="pt") as fh:
            infos = {}
            for name in fh.keys():
                part = fh.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(part.get_dtype(), part.get_dtype().lower())
                infos[name] = TensorInfo(tuple(part.get_shape()), dtype, shard.name)
            return infos
    except (SafetensorError, OSError) as err:
        raise HubFolderError(f"{shard} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_tensor(folder: HubFolder, name: str) -> torch.Tensor | None:
    """One tensor by name (None when the folder has none of that name), reading only its shard."""
    if folder.weight_map is not None:
        if name not in folder.weight_map:
            return None
        shards = [folder.root / folder.weight_map[name]]
    else:
        shards = list(folder.shards)
    for shard in shards:
        names, tensors = _open_shard(shard)
        if name in names:
            return next(t for n, t in tensors if n == name)
    return None


def _check_against_index(folder: HubFolder, shard: Path, names: list[str]) -> None:
    assert folder.weight_map is not None
    listed = {k for k, v in folder.weight_map.items() if v == shard.name}
    extra = sorted(set(names) - listed)
    if extra:
        raise HubFolderError(f"{shard} holds {extra[0]!r}, which the index does not list for it ({len(extra)} such)")
    lost = sorted(listed - set(names))
    if lost:
        raise HubFolderError(f"{shard} lacks {lost[0]!r}, which the index lists ({len(lost)} missing)")


def _open_shard(shard: Path) -> tuple[list[str], Iterator[tuple[str, torch.Tensor]]]:
    """The tensor names of one weights file and a lazy iterator over its tensors."""
    if shard.suffix == ".safetensors":
        try:
            with safe_open(str(shard), framework="pt") as fh:
                names = list(fh.keys())
        except (SafetensorError, OSError) as err:
            raise HubFolderError(f"{shard} is not a readable safetensors file (truncated or corrupt?): {err}") from None
        return names, _read_safetensors(shard)
    state = _load_bin(shard)
    return list(state), _drain(state)


def _read_safetensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)
    except (SafetensorError, OSError) as err:
        raise HubFolderError(f"{shard} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def _drain(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in list(state):
        yield name, state.pop(name)  # drop our reference as we go


def _load_bin(shard: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, weights only; memory-mapped when the file is in the zip format."""
    try:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(shard))
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubFolderError(f"{shard} is not a plain weights file (weights_only refused it): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubFolderError(f"{shard} is not a readable torch file (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HubFolderError(f"{shard} does not hold a flat name -> tensor state dict")
    return state
