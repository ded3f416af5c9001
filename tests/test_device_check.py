"""scripts/device_check.sh --cpu-smoke: the prepared GPU session's script runs its stages at toy
sizes on the CPU and writes its three files, so it does not break between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, stages: str) -> dict:
    args = [str(ROOT / "scripts" / "device_check.sh"), str(out), "--cpu-smoke", "--stages", stages]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    results = json.loads((out / "results.json").read_text())
    assert done.returncode == 0, (done.stdout[-3000:], {k: v.get("output_tail", "")[-2000:]
                                                         for k, v in results["stages"].items()})
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log", "results.json", "summary.md"]
    return results


def test_cpu_smoke_runs_the_pytest_and_inference_stages(tmp_path):
    results = _run(tmp_path, "pytest-gpu,inference-tiny")
    inference = results["stages"]["inference-tiny"]["result"]["rows"]
    expected = {(stage, mode) for stage in ("encode", "decode") for mode in ("fp32", "bf16")}
    assert {(r["stage"], r["mode"]) for r in inference} == expected
    assert all(r["images_per_s"] > 0 and r["share_of_ceiling"] > 0 for r in inference)
    assert "| inference-tiny | ok |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow  # every stage: about a minute on 2 cores
def test_cpu_smoke_runs_every_stage(tmp_path):
    results = _run(tmp_path, "pytest-gpu,inference-tiny,tokenize-files,sampler-tiny,train-step")
    assert all(s["status"] == "ok" for s in results["stages"].values())
    assert results["stages"]["tokenize-files"]["result"]["rows"][0]["files_images_per_s"] > 0
