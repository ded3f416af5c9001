"""Start-up (issue 21, item 8): help pages and the first error of a command with a bad input come
without importing torch, so they answer in about a second rather than after torch's import. Each
case runs `main()` in a fresh interpreter and reports its exit code and whether torch was loaded
(benchmarks/startup.py measures the times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

PROBE = """
import json, sys
sys.argv = ["tokenflow", *sys.argv[1:]]
from tokenflow_cli.cli.app import main
code = 0
try:
    main()
except SystemExit as exit_:
    code = exit_.code
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules}) + "\\n")
"""


def run_probe(args: list[str], cwd) -> tuple[dict, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("PROBE "), proc.stderr[-2000:]
    return json.loads(lines[-1][len("PROBE "):]), lines[:-1] + proc.stdout.splitlines()


@pytest.mark.parametrize("args", [
    ["tokenize", "missing/", "-o", "codes.npz"],
    ["tokenize", "missing/", "-o", "shards", "--shard-size", "4"],
    ["reconstruct", "missing/", "-o", "recon"],
    ["reconstruct", "missing.npz", "-o", "recon"],
    ["codes", "info", "missing.npz"],
    ["eval", "rfid", "missing/", "-o", "rfid"],
    ["eval", "rfid", "--data", "missing/", "-o", "rfid"],
    ["eval", "usage", "missing/", "-o", "usage"],
    ["eval", "atlas", "missing/", "-o", "atlas"],
    ["convert", "missing.pt", "-o", "converted.safetensors"],
    ["ask", "missing.png", "What colour?"],
    ["train-tokenizer", "missing-recipe", "-o", "run"],
    ["train-generator", "missing-recipe", "-o", "run"],
    ["train-teacher", "missing-recipe", "-o", "run"],
    ["finetune-llava", "missing-recipe", "-o", "run"],
    ["generate", "--prompts", "missing.txt", "-o", "generated"],
    ["generate", "--geneval", "missing.jsonl", "-o", "geneval"],
], ids=lambda a: " ".join(a))
def test_first_error_on_a_missing_input_does_not_import_torch(tmp_path, args):
    result, output = run_probe(args, tmp_path)
    errors = [line for line in output if line.startswith("error:")]
    assert result["code"] == 1, output
    assert len(errors) == 1 and "missing" in errors[0], output
    assert not result["torch"], f"torch was imported before the error: {output}"
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"


@pytest.mark.parametrize("args", [
    ["generate", "a red fox", "-o", "blocker/gen"],
    ["eval", "usage", "images", "-o", "blocker/usage"],
    ["eval", "atlas", "images", "-o", "blocker/atlas"],
    ["eval", "rfid", "images", "-o", "blocker/rfid"],
    ["reconstruct", "images", "-o", "blocker/recon"],
], ids=lambda a: " ".join(a))
def test_first_error_on_an_unwritable_output_does_not_import_torch(tmp_path, args):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    result, output = run_probe(args, tmp_path)
    errors = [line for line in output if line.startswith("error:")]
    assert result["code"] == 1, output
    assert len(errors) == 1 and "blocker" in errors[0], output
    assert not result["torch"], f"torch was imported before the error: {output}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "blocker", "images"], "nothing left behind"


def test_help_does_not_import_torch(tmp_path):
    result, output = run_probe(["tokenize", "--help"], tmp_path)
    assert result == {"code": 0, "torch": False}, output
