"""README's "A tour of the commands" runs as written, in order, from one empty folder, with the
shipped defaults: every command line of that block is read from README.md and run through the
real entry point. Only sizes shrink (counts, training steps, eval subsets: `toy_size`), so the
README cannot drift from the code again."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest

from tokenflow_cli import weights
from tokenflow_cli.cli.app import main
from tokenflow_cli.cli.common import CliState

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenflow_cli" / "assets"
TRAINING = {"train-tokenizer", "train-generator", "finetune-llava", "train-teacher"}
SMALL_VALUES = {"-n": "12", "--shard-size": "4"}  # option -> the value used here
TINY_TRAINING = ["train.steps=2", "train.batch_size=4", "train.eval_every=0", "train.checkpoint_every=2",
                 "train.log_every=1", "stage1.steps=2", "data.num_workers=0"]
EXTRA = {  # first words -> options appended to shrink the work (never to change what is run)
    ("generate",): ["-n", "1"],
    ("eval", "rfid"): ["--limit", "2"],
    ("eval", "geneval"): ["--per-tag", "1", "--samples", "1"],
    ("eval", "teacher"): ["--limit", "8"],
    ("eval", "vqa"): ["--limit", "4"],
}


def tour_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The `tokenflow ...` command lines of the tour block, continuations joined, `&&` split."""
    text = readme.read_text()
    start = text.index("```bash", text.index("## A tour of the commands"))
    block = text[start + len("```bash"):text.index("```", start + 3)].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                assert words[0] == "tokenflow", f"not a tokenflow command in the tour: {part!r}"
                commands.append(words[1:])
    return commands


def toy_size(args: list[str]) -> list[str]:
    """The same command at toy size: smaller counts, 2 training steps, small eval subsets."""
    out = [SMALL_VALUES.get(prev, arg) if prev in SMALL_VALUES else arg for prev, arg in zip(["", *args], args)]
    if out[0] in TRAINING:
        known = {"train.steps", "train.batch_size", "train.eval_every", "train.checkpoint_every", "train.log_every",
                 "data.num_workers"} | ({"stage1.steps"} if out[0] == "finetune-llava" else set())
        out += [a for s in TINY_TRAINING if s.split("=")[0] in known for a in ("--set", s)]
    for head, extra in EXTRA.items():
        if tuple(out[:len(head)]) == head:
            out += extra
    return out


def test_the_tour_is_a_list_of_tokenflow_commands():
    commands = tour_commands()
    assert len(commands) >= 15 and {c[0] for c in commands} >= TRAINING | {"tokenize", "reconstruct", "generate"}


def test_the_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(weights, "ASSETS_DIR", SHIPPED)  # a fresh install: the shipped defaults
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("TOKENFLOW_DEBUG", raising=False)
    timings = []
    for args in tour_commands():
        run = toy_size(args)
        CliState.debug = False
        started = time.perf_counter()
        with pytest.raises(SystemExit) as stop:
            main(run)
        out = capsys.readouterr()
        timings.append((time.perf_counter() - started, " ".join(args)))
        assert stop.value.code in (0, None), f"`tokenflow {' '.join(args)}` failed:\n{out.out}\n{out.err}"
        assert "error:" not in out.err and "Traceback" not in out.err, out.err
    print("\n".join(f"{s:6.1f}s  tokenflow {cmd}" for s, cmd in sorted(timings, reverse=True)[:8]))
