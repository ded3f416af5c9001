"""What `eval rfid` keeps on disk so that a killed run resumes, and several ranks share the work.

OUT/
  rfid-run.json                    the run's identity: weights sha256, resolutions, inputs, options
  gts/ samples/ originals/ reconstructions/ <subset>/<index:06d>.png
  units/<subset>/<start:08d>.npz   per unit of images: names, failures, per-image metrics, code counts
  features/<protocol>/<subset>/<start:08d>.npz   per unit: reference and reconstruction features

A unit's PNGs are written before its .npz (each atomically), so a unit counts as done only when
its .npz exists; a killed run redoes at most the units that were in flight. Units are dealt to
ranks round robin (`torchrun`), features likewise; rank 0 reads every file to write the report.
The output folder must be shared by the ranks (one machine, or a shared file system), as the
official script's sample folder is.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_write_bytes, atomic_write_text

MANIFEST = "rfid-run.json"
IMAGE_FOLDERS = ("gts", "samples", "originals", "reconstructions")
MANAGED = (*IMAGE_FOLDERS, "units", "features", "grid.png", MANIFEST)


class RfidRunMismatch(UserError, ValueError):
    """The output folder holds an rfid run with other settings."""


@dataclass(frozen=True)
class Unit:
    subset: str
    start: int  # index of the unit's first image within its subset
    paths: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.subset}/{self.start:08d}"


@dataclass
class UnitResult:
    names: list[str]  # "<index:06d>.png" of the images that loaded
    failures: list[tuple[str, str]]  # (path, reason)
    metrics: dict[str, np.ndarray]  # name -> (n,) per-image values
    usage: dict[str, np.ndarray] = field(default_factory=dict)  # view -> (S, K) code counts


def make_units(subsets: dict[str, list[str]], unit_size: int) -> list[Unit]:
    return [Unit(name, start, tuple(paths[start : start + unit_size]))
            for name, paths in subsets.items() for start in range(0, len(paths), unit_size)]


def mine(units: list[Unit], rank: int, world: int) -> list[Unit]:
    return [u for i, u in enumerate(units) if i % world == rank]


def inputs_sha256(subsets: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(subsets, sort_keys=True).encode()).hexdigest()


def open_run(out_dir: Path, identity: dict, fresh: bool) -> bool:
    """Start or resume the run in `out_dir`: True when earlier work is reused. A folder holding a
    run with another identity is an error unless `fresh` (which clears what this command wrote)."""
    path = out_dir / MANIFEST
    if path.is_file() and not fresh:
        found = json.loads(path.read_text())
        if found == identity:
            return True
        differ = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
        raise RfidRunMismatch(f"{out_dir} holds an rfid run with other settings ({', '.join(differ)} differ): "
                              "use another --output, or --fresh to replace it")
    for name in MANAGED:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(identity, indent=2))
    return False


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def unit_path(out_dir: Path, unit: Unit) -> Path:
    return out_dir / "units" / f"{unit.key}.npz"


def save_unit(out_dir: Path, unit: Unit, result: UnitResult) -> None:
    failures = np.asarray(result.failures, dtype=str).reshape(-1, 2)
    arrays = {"names": np.asarray(result.names, dtype=str), "failures": failures,
              **{f"metric.{k}": v for k, v in result.metrics.items()},
              **{f"usage.{k}": v for k, v in result.usage.items()}}
    atomic_write_bytes(unit_path(out_dir, unit), _npz_bytes(**arrays))


def load_unit(out_dir: Path, unit: Unit) -> UnitResult | None:
    path = unit_path(out_dir, unit)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return UnitResult(
            names=[str(n) for n in data["names"]],
            failures=[(str(p), str(r)) for p, r in data["failures"]],
            metrics={k.removeprefix("metric."): data[k] for k in data.files if k.startswith("metric.")},
            usage={k.removeprefix("usage."): data[k] for k in data.files if k.startswith("usage.")},
        )


def features_path(out_dir: Path, protocol: str, unit: Unit) -> Path:
    return out_dir / "features" / protocol / f"{unit.key}.npz"


def save_features(out_dir: Path, protocol: str, unit: Unit, reference: np.ndarray, reconstruction: np.ndarray) -> None:
    atomic_write_bytes(features_path(out_dir, protocol, unit),
                       _npz_bytes(reference=reference, reconstruction=reconstruction))


def load_features(out_dir: Path, protocol: str, unit: Unit) -> tuple[np.ndarray, np.ndarray] | None:
    path = features_path(out_dir, protocol, unit)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["reference"], data["reconstruction"]
