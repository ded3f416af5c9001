"""Sharded tokenize killed twice with SIGKILL (once mid-shard) and resumed == an uninterrupted run.

    python benchmarks/tokenize_resume.py --images 3000 --shard-size 250

Renders a shapes world, runs `tokenflow tokenize --shard-size` once uninterrupted, then once
killed after the 3rd shard appears (so inside the 4th), resumed and killed again after the 7th,
then resumed to the end (with `--nproc 2` the last resume runs under torchrun). Prints a table
and writes JSON to benchmarks/results/tokenize_resume.json: shards equal byte for byte, images,
seconds per leg and the work the resumes redid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "tokenflow_cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "tokenflow_cli",
            *args]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_to_end(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_and_kill(cmd: list[str], folder: Path, after_shards: int) -> tuple[float, int, bool]:
    """SIGKILL the run once `after_shards` shard files exist; returns seconds, shards seen, whether a
    shard was in progress (its temporary file existed or the next shard was not yet written)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while len(list(folder.glob("codes-*.npz"))) < after_shards and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)  # well inside the next shard
    mid_shard = proc.poll() is None
    if mid_shard:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - start, len(list(folder.glob("codes-*.npz"))), mid_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=2, help="processes for the last resume")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "tokenize_resume.json")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tokenize_resume_"))
    data = work / "shapes"
    if not (data / "images").is_dir():
        subprocess.run(cli(["data", "shapes", "-n", str(args.images), "-o", str(data), "--size", "64"]),
                       env=env(), check=True, stdout=subprocess.DEVNULL)
    common = ["tokenize", str(data / "images"), "--shard-size", str(args.shard_size), "-b", str(args.batch_size),
              "--device", "cpu"]
    ref, run = work / "uninterrupted", work / "resumed"
    seconds_ref = run_to_end(cli([*common, "-o", str(ref)]))
    leg1 = run_and_kill(cli([*common, "-o", str(run)]), run, 3)
    leg2 = run_and_kill(cli([*common, "-o", str(run), "--resume"]), run, 7)
    seconds_last = run_to_end(cli([*common, "-o", str(run), "--resume"], nproc=args.nproc))

    ref_files = {p.name: p.read_bytes() for p in sorted(ref.glob("codes-*.npz"))}
    run_files = {p.name: p.read_bytes() for p in sorted(run.glob("codes-*.npz"))}
    manifest = json.loads((run / "manifest.json").read_text())
    result = {
        "images": args.images, "shard_size": args.shard_size, "shards": len(ref_files),
        "identical": ref_files == run_files, "manifest_complete": manifest["complete"],
        "images_in_manifest": manifest["images"],
        "uninterrupted_s": round(seconds_ref, 1),
        "killed_1": {"after_s": round(leg1[0], 1), "shards_done": leg1[1], "mid_shard": leg1[2]},
        "killed_2": {"after_s": round(leg2[0], 1), "shards_done": leg2[1], "mid_shard": leg2[2]},
        "last_resume_s": round(seconds_last, 1), "last_resume_processes": args.nproc,
        "command": "python benchmarks/tokenize_resume.py " + " ".join(sys.argv[1:]),
    }
    rows = [("images / shards", f"{args.images} / {len(ref_files)} of {args.shard_size}"),
            ("uninterrupted", f"{seconds_ref:.1f} s"),
            ("run 1 killed", f"after {leg1[0]:.1f} s, {leg1[1]} shards done, mid-shard: {leg1[2]}"),
            ("run 2 (resume) killed", f"after {leg2[0]:.1f} s, {leg2[1]} shards done, mid-shard: {leg2[2]}"),
            (f"run 3 (resume, {args.nproc} processes)", f"{seconds_last:.1f} s"),
            ("shards identical byte for byte", str(result["identical"])),
            ("manifest complete", f"{manifest['complete']} ({manifest['images']} images)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    sys.exit(0 if result["identical"] and manifest["complete"] else 1)


if __name__ == "__main__":
    main()
