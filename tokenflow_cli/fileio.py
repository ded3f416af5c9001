"""Atomic file writes: a temporary file in the target folder, fsync'd, then renamed into place,
so a reader (or a crash) never sees half a file. A write that fails part way (disk full, a
file-size limit) raises `OutputWriteError`, which says the previous file is unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenflow_cli.errors import UserError


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


WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS})


class OutputWriteError(UserError, OSError):
    """Writing an output failed part way (a full disk, a file-size limit, an I/O error); the
    temporary file is removed and the previous version of the output, if any, is untouched."""


def write_failed(path: Path, err: OSError) -> OutputWriteError:
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    reason = err.strerror or str(err)
    return OutputWriteError(f"could not write {path}: {reason} (errno {err.errno}); {kept}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path, tmp = _atomic_target(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    except OutputWriteError:
        raise
    except OSError as err:
        raise write_failed(path, err) from err
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
            elif isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
                raise write_failed(self.path, exc) from exc
        except OutputWriteError:
            raise
        except OSError as err:  # the commit itself failed (fsync, rename)
            raise write_failed(self.path, err) from err
        finally:
            self.tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class UnwritableOutputError(UserError, OSError):
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


def check_writable_dir(path: str | Path) -> None:
    """Like `check_writable` for an output folder: it must be (or become) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnwritableOutputError(f"output {path} is a file; give a folder for the shards")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnwritableOutputError(f"cannot create the output folder {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UnwritableOutputError(f"output folder {path} is not writable")


def replace_folder(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder `tmp` in place of `out_dir` (two renames; a crash in between leaves
    the previous folder as `.<name>.old`, never half a folder under the real name)."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
