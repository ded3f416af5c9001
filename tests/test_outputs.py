"""Outputs are owned (tokenflow_cli/fileio.py, OutputClaim): a folder is written beside its
name and swapped in whole, so a rerun never leaves a mix of old and new files; a folder another
command wrote is refused without --overwrite; a second writer fails instead of both reporting
success; what a killed run left (named after the output and its process) goes on the next run;
codes record absolute paths, so they decode from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenflow_cli.cli.app import main
from tokenflow_cli.cli.common import CliState
from tokenflow_cli.data.shapes import render_shapes_world
from tokenflow_cli.fileio import (
    MARKER_NAME,
    OutputBusyError,
    OutputClaim,
    OutputExistsError,
    atomic_write_text,
    remove_stale_temps,
    temp_sibling,
)
from tokenflow_cli.tokenizer.codes import read_codes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run(capsys, monkeypatch, *args) -> tuple[int, str]:
    monkeypatch.delenv("COLUMNS", raising=False)  # as in a pipe: Rich must not wrap anything
    CliState.debug = False
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return stop.value.code, out.out + out.err


def test_a_folder_is_swapped_in_whole_and_only_on_success(tmp_path):
    out = tmp_path / "gen"
    with OutputClaim(out, "folder", "generate") as claim:
        claim.tmp.mkdir()
        for i in range(8):
            (claim.tmp / f"{i:05d}.png").write_bytes(b"x")
        assert not out.exists()  # nothing under the real name until the end
    assert len(list(out.glob("*.png"))) == 8
    with OutputClaim(out, "folder", "generate") as claim:  # a smaller rerun replaces, never mixes
        claim.tmp.mkdir()
        (claim.tmp / "00000.png").write_bytes(b"y")
    assert sorted(p.name for p in out.iterdir()) == sorted(["00000.png", MARKER_NAME])
    with pytest.raises(RuntimeError), OutputClaim(out, "folder", "generate") as claim:
        claim.tmp.mkdir()
        (claim.tmp / "00000.png").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert (out / "00000.png").read_bytes() == b"y"  # the failed run changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # and left nothing


def test_a_folder_of_other_files_needs_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        OutputClaim(out, "folder", "reconstruct")
    atomic_write_text(out / MARKER_NAME, '{"command": "generate"}')
    with pytest.raises(OutputExistsError, match="tokenflow reconstruct"):
        OutputClaim(out, "folder", "reconstruct")
    assert (out / "thesis.tex").read_text() == "keep me"
    with OutputClaim(out, "folder", "reconstruct", overwrite=True) as claim:
        claim.tmp.mkdir()
    assert not (out / "thesis.tex").exists()


def test_a_second_writer_fails_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "codes.npz"
    first = OutputClaim(out, "file", "tokenize")
    with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
        OutputClaim(out, "file", "tokenize")
    first.release()
    out.with_name(".codes.npz.lock").write_text(str(_dead_pid()))
    OutputClaim(out, "file", "tokenize").commit()
    assert list(tmp_path.iterdir()) == []


def test_temporaries_carry_the_output_name_and_dead_ones_are_removed(tmp_path):
    out = tmp_path / "codes.npz"
    dead, alive = _dead_pid(), os.getpid()
    scratch = out.with_name(f".codes.npz.scratch-{dead}")
    scratch.mkdir()
    (scratch / "indices.bin").write_bytes(b"\0" * 64)
    stale = [scratch, out.with_name(f".codes.npz.tmp-{dead}-x1y2.npz"), out.with_name(f".codes.npz.partial-{dead}")]
    for path in stale[1:]:
        path.write_bytes(b"")
    running = temp_sibling(out, "scratch")
    running.mkdir()
    others = [out.with_name(f".other.npz.tmp-{dead}-a"), tmp_path / "notes.txt"]
    for path in others:
        path.write_text("")
    assert sorted(remove_stale_temps(out)) == sorted(stale)
    assert running.name == f".codes.npz.scratch-{alive}" and running.exists()
    assert all(p.exists() for p in others)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    render_shapes_world(root / "shapes", 3, seed=0, size=32)
    return root / "shapes" / "images"


def test_tokenize_cleans_up_after_a_killed_run_and_records_absolute_paths(images, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    dead = _dead_pid()
    leftover = work / f".codes.npz.scratch-{dead}"  # what a SIGKILLed tokenize leaves
    leftover.mkdir()
    (leftover / "indices.bin").write_bytes(b"\0" * 128)
    relative = os.path.relpath(images, work)
    code, output = _run(capsys, monkeypatch, "tokenize", relative, "-o", "codes.npz", "--model", "tiny",
                        "--device", "cpu")
    assert code == 0, output
    assert not leftover.exists() and [p.name for p in work.iterdir() if p.name.startswith(".")] == []
    codes = read_codes(work / "codes.npz")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in codes.paths)
    # from another folder the originals are still found: the PSNR column is there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, output = _run(capsys, monkeypatch, "reconstruct", work / "codes.npz", "-o", "recon", "--model", "tiny",
                        "--device", "cpu")
    assert code == 0 and "PSNR" in output, output


def test_old_relative_paths_resolve_from_the_codes_file(images, tmp_path):
    from tokenflow_cli.tokenizer.codes import write_codes

    target = tmp_path / "codes.npz"
    names = [os.path.relpath(p, tmp_path) for p in sorted(images.glob("*.png"))]
    write_codes(target, np.zeros((len(names), 1), np.int32), (1,), names, {"codebook_size": 4})
    assert [p.resolve() for p in read_codes(target).image_paths()] == sorted(images.glob("*.png"))


def test_a_rerun_into_the_same_folder_leaves_no_stale_files(images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "recon"
    code, output = _run(capsys, monkeypatch, "reconstruct", images, "-o", out, "--model", "tiny", "--device", "cpu")
    assert code == 0, output
    assert len(list(out.glob("0*.png"))) == 3
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(images.glob("*.png")).read_bytes())
    code, output = _run(capsys, monkeypatch, "reconstruct", one, "-o", out, "--model", "tiny", "--device", "cpu")
    assert code == 0, output
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "grid.png"]
    assert f"grid: {out / 'grid.png'}" in " ".join(output.split())


def test_errors_and_tables_stay_whole_outside_a_terminal(tmp_path, capsys, monkeypatch):
    deep = tmp_path / ("a-long-folder-name-" * 6) / "codes.npz"
    code, output = _run(capsys, monkeypatch, "codes", "info", deep)
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and str(deep) in lines[0], output
    code, output = _run(capsys, monkeypatch, "doctor")
    assert code == 0, output
    assert str(Path(os.environ["TOKENFLOW_HOME"]) / "tokenizer") in output  # a path, uncut, in the table
