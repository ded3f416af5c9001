"""One prepared GPU session (issue 23): every check and benchmark as a time-boxed stage, every
figure into one folder as it completes.

    python benchmarks/device_check.py [OUT_DIR] [--cpu-smoke] [--budget 360] [--stages a,b]

Writes `results.json` (per stage: command, return code, seconds, status, the benchmark's own JSON,
the tail of its output), `summary.md` (one table of the figures that matter) and `device_check.log`
(every stage's full output), all three rewritten after every stage, so a run killed at its limit
keeps what it finished. A stage that fails or runs out of time is recorded and the next one runs.
Each stage runs in its own process group under its own time box, cut to the time left of
`--budget` seconds. `--cpu-smoke` runs the same stages at toy sizes on the CPU (what `make test`
checks, so the script never breaks between GPU sessions); OUT_DIR defaults to $OUT, else
./device_check_out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import device_summary

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
LOG_LIMIT = 400_000  # characters of one stage's output kept in the log


@dataclass
class Stage:
    name: str
    argv: list[str]  # {tmp} is replaced by the stage's scratch folder
    seconds: int  # time box
    json_name: str = ""  # the file under {tmp} the command writes its figures to
    env: dict[str, str] = field(default_factory=dict)


def gpu_stages() -> list[Stage]:
    """Time boxes from the first H200 run (2026-12-04, docs/RESULTS.md "GPU (one H200)"): each is
    that run's stage time plus ~15%; the sum of the expected times is ~6 minutes. GPU timings
    repeated within 1% there, so one repeat; compile only at the largest batch (inference.py)."""
    py = sys.executable
    return [
        Stage("pytest-gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu",
                             "--junitxml={tmp}/junit.xml", "-rA"], 95, "junit.xml"),  # 83 s in run 1
        # 110 s was too short in run 1 (batch 16 and 64, 2 repeats, fp32 mode): batch 64 only, no fp32
        # mode (within 3% of official on CUDA; fp32 CUDA == CPU indices is a pytest), one repeat
        Stage("inference-clipb-256-enhanced", [py, "benchmarks/inference.py", "--device", "cuda", "--layouts",
                                               "clipb-256-enhanced", "--batch-sizes", "64", "--repeats", "1",
                                               "--modes", "official,tf32,bf16,bf16-compile",
                                               "--json", "{tmp}/out.json"], 105, "out.json"),
        Stage("tokenize-files", [py, "benchmarks/tokenize_throughput.py", "--device", "cuda", "--layout",
                                 "clipb-256-enhanced", "--images", "768", "--batch-size", "64", "--workers", "12",
                                 "--dtypes", "bf16", "--json", "{tmp}/out.json"], 40, "out.json"),  # 38 s with fp32
        Stage("sampler-7b-shaped", [py, "benchmarks/sampler.py", "--device", "cuda", "--dtype", "bf16", "--configs",
                                    "7b-shaped", "--layers", "4", "--big-batch", "1,8", "--big-schedules",
                                    "one-pass,two-pass", "--big-repeats", "1", "--json", "{tmp}/out.json"],
              70, "out.json"),  # 59 s with 2 repeats
        Stage("train-step", [py, "benchmarks/train_throughput.py", "--suite", "gpu", "--device", "cuda", "--threads",
                             "8", "--rounds", "1", "--steps", "2", "--batch-sizes", "8", "--layers", "4",
                             "--json", "{tmp}/out.json"], 75, "out.json"),  # 68 s with 2 rounds
        Stage("inference-siglip-384", [py, "benchmarks/inference.py", "--device", "cuda", "--layouts", "siglip-384",
                                       "--batch-sizes", "32", "--repeats", "1", "--modes",
                                       "official,tf32,bf16", "--json", "{tmp}/out.json"], 60, "out.json"),
    ]


def smoke_stages() -> list[Stage]:
    py = sys.executable
    small = ["--ceiling-size", "256"]
    return [
        Stage("pytest-gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu",
                             "--junitxml={tmp}/junit.xml"], 60, "junit.xml"),
        Stage("inference-tiny", [py, "benchmarks/inference.py", "--layouts", "tiny", "--batch-sizes", "2",
                                 "--repeats", "1", "--modes", "fp32,bf16", *small, "--json", "{tmp}/out.json"],
              60, "out.json"),
        Stage("tokenize-files", [py, "benchmarks/tokenize_throughput.py", "--layout", "tiny", "--images", "8",
                                 "--batch-size", "4", "--workers", "1", "--dtypes", "fp32", *small,
                                 "--json", "{tmp}/out.json"], 60, "out.json"),
        Stage("sampler-tiny", [py, "benchmarks/sampler.py", "--configs", "tiny-official", "--schedules", "one-pass",
                               "--batch", "1", "--repeats", "1", *small, "--json", "{tmp}/out.json"], 60, "out.json"),
        Stage("train-step", [py, "benchmarks/train_throughput.py", "--suite", "smoke", "--quick", "--batch-sizes",
                             "2", "--layers", "1", *small, "--json", "{tmp}/out.json"], 90, "out.json"),
    ]


PROBE = """import json, platform, importlib.metadata as md, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("open_clip_torch", "lpips", "torch-fidelity", "transformers", "webdataset", "datasets", "ftfy"):
    try:
        info["pkg_" + name] = md.version(name)
    except md.PackageNotFoundError:
        info["pkg_" + name] = "missing"
print(json.dumps(info))"""


def environment(smoke: bool) -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "mode": "cpu-smoke" if smoke else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError) as err:
        info["probe_error"] = repr(err)
    return info


def run_stage(stage: Stage, tmp: Path, seconds: float, log) -> dict:
    """Run one stage in its own process group; never raises."""
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [a.replace("{tmp}", str(tmp)) for a in stage.argv]
    record = {"command": " ".join(argv), "time_box_s": round(seconds), "status": "ok"}
    log.write(f"\n===== {stage.name} ({time.strftime('%H:%M:%S')}, time box {seconds:.0f} s)\n$ {record['command']}\n")
    log.flush()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(ROOT),
                                                                     os.environ.get("PYTHONPATH", "")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **stage.env}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=seconds)
        record["returncode"] = proc.returncode
        if proc.returncode != 0:
            record["status"] = "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group (compile workers included)
        output, _ = proc.communicate()
        record.update(returncode=None, status="timed out")
    record["seconds"] = round(time.perf_counter() - start, 1)
    log.write(output[-LOG_LIMIT:] + f"\n----- {stage.name}: {record['status']} in {record['seconds']} s\n")
    log.flush()
    record["output_tail"] = output[-3000:]
    result = tmp / stage.json_name if stage.json_name else None
    if result is not None and result.is_file():
        try:
            record["result"] = junit_figures(result) if result.suffix == ".xml" else json.loads(result.read_text())
        except (ValueError, ET.ParseError) as err:
            record["result_error"] = repr(err)
    return record


def junit_figures(path: Path) -> dict:
    """Per test: outcome and the figures it recorded with record_property."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = tag if tag != "failure" else "failed"
                tests[case.get("name")] = {"outcome": outcome, "message": (node.get("message") or "")[:500]}
        entry = tests.setdefault(case.get("name"), {"outcome": outcome})
        for prop in case.iter("property"):
            entry[prop.get("name")] = prop.get("value")
    return tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path(os.environ.get("OUT") or "device_check_out"))
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (make test runs this)")
    parser.add_argument("--budget", type=float, default=360, help="seconds for all stages together")
    parser.add_argument("--stages", default="", help="comma list of stage names (default: all)")
    args = parser.parse_args()
    stages = smoke_stages() if args.cpu_smoke else gpu_stages()
    if args.stages:
        stages = [s for s in stages if s.name in args.stages.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    results = {"environment": environment(args.cpu_smoke), "stages": {}}
    paths = args.out / "results.json", args.out / "summary.md", args.out / "device_check.log"

    def flush() -> None:
        paths[0].write_text(json.dumps(results, indent=1, default=str))
        paths[1].write_text(device_summary.render(results))

    flush()
    scratch = Path(tempfile.mkdtemp(prefix="device-check-"))  # stage outputs: only the three files go to OUT
    with open(paths[2], "a") as log:
        log.write(f"device_check {'--cpu-smoke ' if args.cpu_smoke else ''}started {time.ctime()}\n"
                  f"{json.dumps(results['environment'])}\n")
        for stage in stages:
            left = deadline - time.perf_counter()
            if left < 10:
                results["stages"][stage.name] = {"status": "skipped (budget spent)"}
            else:
                results["stages"][stage.name] = run_stage(stage, scratch / stage.name, min(stage.seconds, left), log)
            flush()
            print(f"{stage.name}: {results['stages'][stage.name]['status']}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(paths[1].read_text())
    return 0 if all(s["status"] == "ok" for s in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
