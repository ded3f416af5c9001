"""Atomic file writes: a temporary file in the target folder, fsync'd, then renamed into place,
so a reader (or a crash) never sees half a file. A write that fails part way (disk full, a
file-size limit) raises `OutputWriteError`, which says the previous file is unchanged.

Every command that writes owns its output through `OutputClaim` (docs/ARCHITECTURE.md, "Outputs"):
checked before any work, locked against a second writer, a folder written beside it and swapped
in whole, and every temporary name `.NAME.TAG-PID...` so the next run removes what a killed one
left.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenflow_cli.errors import UserError


def _atomic_target(path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
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
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-", suffix=self.suffix,
                                   dir=self.path.parent)
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


def replace_folder(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder `tmp` in place of `out_dir` (two renames; a crash in between leaves
    the previous folder as `.<name>.old-PID`, never half a folder under the real name; the next
    `OutputClaim` of `out_dir` removes it)."""
    old = temp_sibling(out_dir, "old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---- owned outputs ---------------------------------------------------------------------------

TEMP_TAGS = ("tmp", "partial", "scratch", "old")  # what a temporary sibling is for
MARKER_NAME = ".tokenflow-output.json"  # in an output folder: which command wrote it
LOCK_GRACE_S = 10.0  # a lock file too new to hold its pid yet is taken as held


def temp_sibling(path: Path, tag: str) -> Path:
    """A temporary name beside `path` that carries its name and this process: `.NAME.TAG-PID`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of `path` (`.NAME.TAG-PID...`) whose process is gone: what a
    killed or crashed run left (a half-written file, a partial folder, an index buffer)."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:{'|'.join(TEMP_TAGS)})-(\d+)(?:\D|$)")
    removed = []
    for child in path.parent.glob(f".{glob.escape(path.name)}.*") if path.parent.is_dir() else []:
        match = pattern.match(child.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    return removed


@contextmanager
def scratch_folder(path: str | Path) -> Iterator[Path]:
    """A folder for work files beside the output `path` (`.NAME.scratch-PID`: same filesystem,
    named after the output), removed on exit; a killed run's is removed by the next `OutputClaim`."""
    folder = temp_sibling(Path(path), "scratch")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class OutputBusyError(UserError, OSError):
    """Another process is writing the same output."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder that holds something this command did not write (refused without --overwrite)."""


def _take_lock(path: Path) -> Path:
    """`.NAME.lock` beside `path`, created exclusively and holding our pid; a lock whose process
    is gone is taken over. Creating it is also the writability probe of the output's folder."""
    lock = path.with_name(f".{path.name}.lock")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            held = _pid_alive(int(text)) if text.isdigit() else age < LOCK_GRACE_S
            if held:
                owner = f" (pid {text})" if text.isdigit() else ""
                raise OutputBusyError(f"output {path} is being written by another tokenflow process{owner}; "
                                      "wait for it to finish or choose another -o") from None
            lock.unlink(missing_ok=True)
            continue
        except OSError as err:
            raise UnwritableOutputError(f"output {path} is not writable: {err.strerror or err}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    raise OutputBusyError(f"output {path} is being claimed by another tokenflow process; try again")


class OutputClaim:
    """An output a command owns from before its work starts until the result is in place.

    `kind`: "file" (written by the library with `atomic_path`), "folder" (written into `tmp`, a
    temporary sibling, and swapped in whole by `commit`, so no run leaves a mix of old and new
    files; an existing folder is replaced only when this command wrote it, or with
    `overwrite`) or "run" (a resumable run folder: written in place). Creating the claim checks
    the path (before any model loads or image is read), takes `.NAME.lock` (a second writer
    fails at once instead of both reporting success) and removes the temporaries of killed
    runs. Leaving without `commit` (an error, Ctrl-C) removes the temporary folder and any
    parent folder the claim made. Under torchrun only rank 0 locks and swaps.

        with OutputClaim(out, "folder", "generate") as claim:
            write_everything(claim.tmp)
    """

    def __init__(self, path: str | Path, kind: str, command: str, overwrite: bool = False) -> None:
        if kind not in ("file", "folder", "run"):
            raise ValueError(f"kind must be file, folder or run, got {kind!r}")
        self.path, self.kind, self.command, self.overwrite = Path(path), kind, command, overwrite
        self.main = int(os.environ.get("RANK", "0")) == 0
        self.tmp = temp_sibling(self.path, "partial") if kind == "folder" and self.main else self.path
        self.done, self.lock, self.created = False, None, []
        self._check()
        self._make_parents()
        if self.main:
            try:
                self.lock = _take_lock(self.path)
            except UserError:
                self.release()
                raise
            remove_stale_temps(self.path)

    def _check(self) -> None:
        path = self.path
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UnwritableOutputError(f"cannot create the folder of output {path}: {parent} is a file")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise UnwritableOutputError(f"output {path} is not writable ({parent} is read-only)")
                break
        if self.kind == "file" and path.is_dir():
            raise UnwritableOutputError(f"output {path} is a folder; give a file path")
        if self.kind != "file" and path.exists() and not path.is_dir():
            raise UnwritableOutputError(f"output {path} is a file; give a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise UnwritableOutputError(f"output {path} is not writable")
        if self.kind == "folder" and not self.overwrite and not self._replaceable():
            raise OutputExistsError(
                f"output folder {path} already holds files that `tokenflow {self.command}` did not write; "
                "pass --overwrite to replace it, or choose another -o")

    def _replaceable(self) -> bool:
        """An absent or empty folder, or one this command wrote (its marker says so)."""
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return True
        try:
            return json.loads((self.path / MARKER_NAME).read_text()).get("command") == self.command
        except (OSError, ValueError, AttributeError):
            return False

    def _make_parents(self) -> None:
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:
                    if folder.is_dir():  # another torchrun rank made it first
                        continue
                    raise
                self.created.append(folder)
        except OSError as err:
            self.release()
            raise UnwritableOutputError(f"cannot create the folder of output {self.path}: "
                                        f"{err.strerror or err}") from None

    def commit(self) -> None:
        """The work is done: swap a folder output in (with its marker), release the lock."""
        if self.kind == "folder" and self.main:
            self.tmp.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.tmp / MARKER_NAME, json.dumps({"command": self.command}))
            replace_folder(self.tmp, self.path)
        self.done = True
        self.release()

    def release(self) -> None:
        """Give the output up; unless committed, remove what the claim made (idempotent)."""
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None
        if not self.done:
            if self.kind == "folder" and self.tmp != self.path:
                shutil.rmtree(self.tmp, ignore_errors=True)
            for folder in reversed(self.created):
                try:
                    folder.rmdir()  # only while empty
                except OSError:
                    break
            self.created = []

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.release()
