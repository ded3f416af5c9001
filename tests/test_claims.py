"""benchmarks/claims.py's pure parts: the bootstrap CI, the seed range, the Markdown report (a
section not run shows `not run` and its command) and the splice into an existing RESULTS.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from claims import BEGIN, END, bootstrap_ci, format_ci, parse_args, render_markdown, splice  # noqa: E402
from claims_tokenizer import format_range, seed_range  # noqa: E402


def test_bootstrap_ci_of_a_fair_coin_matches_the_normal_interval() -> None:
    point, lo, hi = bootstrap_ci([0.0] * 200 + [1.0] * 200, resamples=2000)
    half = 1.96 * (0.25 / 400) ** 0.5  # 0.049: the normal approximation of the 95% interval
    assert point == 0.5
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)


def test_bootstrap_ci_is_seeded_and_degenerate_on_a_constant_sample() -> None:
    sample = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert bootstrap_ci(sample, seed=3) == bootstrap_ci(sample, seed=3)
    assert bootstrap_ci([0.7] * 9) == pytest.approx((0.7, 0.7, 0.7))


def test_bootstrap_ci_with_groups_is_the_mean_of_group_means() -> None:
    # tag a: 3 prompts all right; tag b: 1 prompt wrong -> mean over tags 0.5, not the item mean 0.75
    point, lo, hi = bootstrap_ci([1.0, 1.0, 1.0, 0.0], groups=["a", "a", "a", "b"])
    assert point == 0.5
    assert 0.0 <= lo <= point <= hi <= 1.0


def test_seed_range_and_formats() -> None:
    assert seed_range([1.0, 3.0, 2.0]) == (2.0, 1.0, 3.0)
    assert format_range([0.5, 0.7], scale=100) == "60.0 [50.0, 70.0]"
    assert format_range([0.5], scale=100) == "50.0 (1 seed)"
    assert format_range([]) == "-"
    assert format_ci((0.5, 0.25, 0.75)) == "50.0 [25.0, 75.0]"


def _result() -> dict:
    table = {"title": "Index rule at equal K", "columns": ["index rule", "usage %"],
             "rows": [{"cells": ["shared", "97.0 [96.0, 98.0]"], "commands": ["tokenflow train-tokenizer shapes-toy"]},
                      {"cells": ["all scales", "not measured: no all-scales feature source"], "commands": []}],
             "notes": ["range over seeds"]}
    return {"date": "2026-01-02", "device": "cpu", "machine": {"cpu": "Test CPU", "cores": "2", "threads": "1"},
            "commands": {"understanding": "python benchmarks/claims.py --only understanding"},
            "sections": {
                "codebooks": {"status": "done", "date": "2026-01-02", "machine": "Test CPU, 1 threads",
                              "command": "python benchmarks/claims.py --only codebooks", "tables": [table]},
                "generation": {"status": "not run", "reason": "no --generator given",
                               "command": "python benchmarks/claims.py --only generation --generator G"}}}


def test_render_markdown_shows_figures_commands_and_sections_not_run() -> None:
    text = render_markdown(_result())
    assert "Test CPU (2 cores, OMP_NUM_THREADS=1" in text and "2026-01-02" in text
    assert "| shared | 97.0 [96.0, 98.0] | c1 |" in text
    assert "| all scales | not measured: no all-scales feature source | - |" in text
    assert "# c1\ntokenflow train-tokenizer shapes-toy" in text
    # a section missing from the result and one marked not run: both say so, with their command
    understanding = text.split("### understanding")[1].split("###")[0]
    assert "not run" in understanding and "python benchmarks/claims.py --only understanding" in understanding
    generation = text.split("### generation")[1]
    assert "not run (no --generator given)" in generation
    assert "python benchmarks/claims.py --only generation --generator G" in generation


def test_splice_keeps_the_rest_of_the_file_and_replaces_its_block() -> None:
    first = splice("# Measured results\n\nolder figures\n", "block one\n")
    assert first.startswith("# Measured results\n\nolder figures\n") and f"{BEGIN}\nblock one\n{END}\n" in first
    second = splice(first + "after\n", "block two\n")
    assert "block one" not in second and "block two" in second and second.endswith("after\n")
    assert second.count(BEGIN) == 1
    assert splice("", "only\n") == f"{BEGIN}\nonly\n{END}\n"


def test_quick_fills_only_the_options_not_given(tmp_path: Path) -> None:
    a = parse_args(["--data", str(tmp_path), "--quick", "--steps", "5", "--only", "codebooks"])
    assert (a.steps, a.seeds, a.eval_images) == (5, 1, 16)
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--only", "codebook"])
