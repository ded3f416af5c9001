"""Atomic file writes: a temporary file in the target folder, fsync'd, then renamed into place,
so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class UnwritableOutputError(OSError):
    """An output path that cannot be written; raised before any work starts."""


def check_writable(path: str | Path) -> None:
    """Fail early, naming the path, when `path` cannot be written: its folder cannot be created
    or is not writable, or the path is a folder. Creates the missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise UnwritableOutputError(f"output {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnwritableOutputError(f"cannot create the folder of output {path}: {err.strerror or err}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UnwritableOutputError(f"output {path} is not writable")
