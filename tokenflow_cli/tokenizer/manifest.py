"""`manifest.json` of a sharded codes folder (format in docs/CODES.md): what the run reads and
with which tokenizer, and every finished shard with its image count and sha256. Written
atomically by rank 0 after each of its shards and at the end; finished shards written by other
ranks are picked up from the folder (a shard file exists only once it is complete)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import atomic_write_text, file_sha256
from tokenflow_cli.tokenizer.codes import MANIFEST_NAME, read_codes_meta

FORMAT = "tokenflow-codes-shards/1"
SHARD_GLOB = "codes-[0-9][0-9][0-9][0-9][0-9].npz"


def shard_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"codes-{index:05d}.npz"


@dataclass
class ShardRecord:
    file: str  # name inside the folder
    images: int  # rows in the shard
    failed: int  # items skipped as unreadable
    sha256: str
    size: int  # bytes, with mtime_ns a cheap "unchanged since hashed" check
    mtime_ns: int


@dataclass
class Manifest:
    identity: dict  # inputs, tokenizer, shard_size, scales, codebook_size (tokenizer.shards.run_identity)
    shards: dict[str, ShardRecord] = field(default_factory=dict)  # str(index) -> record
    total_shards: int | None = None  # known once a run has read the whole input
    complete: bool = False

    @property
    def images(self) -> int:
        return sum(r.images for r in self.shards.values())

    def matches_checksum(self, index: int, path: Path) -> bool:
        record = self.shards.get(str(index))
        if record is None:
            return True  # finished after the last manifest write (another rank, or killed before it)
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (record.size, record.mtime_ns):
            return True
        return file_sha256(path) == record.sha256

    def refresh(self, out_dir: Path) -> None:
        """Record every finished shard file in `out_dir` that belongs to this run."""
        want = self.identity["tokenizer"].get("sha256")
        for path in sorted(Path(out_dir).glob(SHARD_GLOB)):
            index = int(path.stem.split("-")[1])
            stat = path.stat()
            known = self.shards.get(str(index))
            if known and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                meta = read_codes_meta(path)
            except (OSError, ValueError):
                continue
            if meta.get("shard_index") != index or meta.get("tokenizer_sha256") != want:
                continue
            self.shards[str(index)] = ShardRecord(path.name, _rows(path), int(meta.get("failed", 0)),
                                                  file_sha256(path), stat.st_size, stat.st_mtime_ns)

    def to_json(self) -> str:
        data = {"format": FORMAT, **self.identity, "total_shards": self.total_shards, "complete": self.complete,
                "images": self.images,
                "shards": [asdict(self.shards[k]) | {"index": int(k)} for k in sorted(self.shards, key=int)]}
        return json.dumps(data, indent=2) + "\n"


def _rows(path: Path) -> int:
    with np.load(path, allow_pickle=False, mmap_mode="r") as data:
        return int(data["paths"].shape[0])


def read_manifest(out_dir: Path) -> Manifest | None:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        identity = {k: data[k] for k in ("inputs", "tokenizer", "shard_size", "scales", "codebook_size")}
        shards = {str(s["index"]): ShardRecord(**{k: v for k, v in s.items() if k != "index"})
                  for s in data.get("shards", [])}
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a tokenflow shard manifest ({err}); move it away to start over") from None
    return Manifest(identity, shards, data.get("total_shards"), bool(data.get("complete")))


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    atomic_write_text(Path(out_dir) / MANIFEST_NAME, manifest.to_json())


def check_same_run(existing: Manifest, identity: dict, out_dir: Path) -> None:
    """Refuse to resume with another tokenizer, shard size or input than the run began with."""
    was, now = existing.identity, identity
    checks = [
        ("tokenizer", was["tokenizer"].get("sha256"), now["tokenizer"].get("sha256")),
        ("shard size", was["shard_size"], now["shard_size"]),
        ("scales", list(was["scales"]), list(now["scales"])),
        ("input", (was["inputs"]["kind"], was["inputs"]["source"]), (now["inputs"]["kind"], now["inputs"]["source"])),
        ("input count", was["inputs"].get("count"), now["inputs"].get("count")),
    ]
    for what, before, after in checks:
        if before != after:
            raise UserError(f"cannot resume {out_dir}: its run used {what} {before}, this one {after}; "
                            "use the same settings or another output folder")


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files a killed run left behind (atomic writes rename only complete files)."""
    for tmp in Path(out_dir).glob(".codes-*.tmp*"):
        tmp.unlink(missing_ok=True)
    for tmp in Path(out_dir).glob(f".{Path(MANIFEST_NAME).stem}.*.tmp*"):
        tmp.unlink(missing_ok=True)
