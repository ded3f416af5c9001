"""A safetensors file written tensor by tensor, so a converter holds one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte range; `__metadata__`) and the raw little-endian bytes. All names, shapes and dtypes are
known before the first tensor arrives (the converter plans them from the model built on the
meta device), so the header is written first and each tensor lands at its offset in whatever
order the source shards give them. The file is readable by `safetensors` and our
`checkpoint.load_state`; it appears only when complete (atomic rename).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tokenflow_cli.fileio import atomic_path

__all__ = ["SAFETENSORS_DTYPE_NAMES", "StreamWriter", "stream_writer"]

SAFETENSORS_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StreamWriter:
    def __init__(self, fh, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> None:
        self.fh, self.specs = fh, specs
        header: dict[str, object] = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        position = 0
        for name in sorted(specs):
            shape, dtype = specs[name]
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [position, position + size]}
            self.offsets[name] = position
            position += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(blob)
        self.total = position
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(self.data_start + position)
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}")
        if name in self.written:
            raise ValueError(f"{name} written twice")
        self.fh.seek(self.data_start + self.offsets[name])
        flat = tensor.detach().contiguous().reshape(-1)
        self.fh.write(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
        self.written.add(name)

    def missing(self) -> list[str]:
        return sorted(set(self.specs) - self.written)


@contextmanager
def stream_writer(path: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  metadata: dict[str, str]) -> Iterator[StreamWriter]:
    """Write `path` tensor by tensor; every planned tensor must be written before the file
    replaces `path`."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        writer = StreamWriter(fh, specs, metadata)
        yield writer
        missing = writer.missing()
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]!r}")
