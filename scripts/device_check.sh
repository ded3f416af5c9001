#!/usr/bin/env bash
# One prepared GPU session (issue 23): pytest -m gpu, the inference / tokenize / sampler / training
# benchmarks at full size, each time-boxed, every figure into OUT_DIR (default $OUT, else
# ./device_check_out) as results.json, summary.md and device_check.log.
#   scripts/device_check.sh [OUT_DIR] [--cpu-smoke] [--budget SECONDS] [--stages a,b]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" benchmarks/device_check.py "$@"
