"""Start-up cost of the CLI: wall time of `tokenflow ...` invocations that end before any real
work (help pages, the first error of a bad input), in a fresh process each, and whether torch
was imported on the way. Prints a table; `--json PATH` writes the figures.

    python benchmarks/startup.py --repeat 3 --json benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [
    ["--help"],
    ["tokenize", "--help"],
    ["generate", "--help"],
    ["tokenize", "no-such-folder", "-o", "codes.npz"],  # "no images found"
    ["reconstruct", "no-such-codes.npz", "-o", "recon"],
    ["eval", "rfid", "--res", "-5"],  # a usage error
]

PROBE = """
import sys, time
started = time.perf_counter()
sys.argv = ["tokenflow", *sys.argv[1:]]
from tokenflow_cli.cli.app import main
try:
    main()
except SystemExit:
    pass
sys.stderr.write("\\nSTARTUP %.4f %d\\n" % (time.perf_counter() - started, "torch" in sys.modules))
"""


def measure(args: list[str], repeat: int, cwd: str) -> dict:
    times, torch_loaded = [], False
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    for _ in range(repeat):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, env=env)
        wall = time.perf_counter() - started
        line = [x for x in proc.stderr.splitlines() if x.startswith("STARTUP ")][-1].split()
        times.append(wall)
        torch_loaded = torch_loaded or line[2] == "1"
    return {"command": "tokenflow " + " ".join(args), "wall_s_median": statistics.median(times),
            "wall_s_min": min(times), "imports_torch": torch_loaded, "repeat": repeat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cwd:
        rows = [measure(case, args.repeat, cwd) for case in CASES]
    print(f"{'command':<52} {'median s':>9} {'min s':>7}  torch")
    for row in rows:
        print(f"{row['command']:<52} {row['wall_s_median']:>9.2f} {row['wall_s_min']:>7.2f}  "
              f"{'yes' if row['imports_torch'] else 'no'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
