"""Option values are checked when the command line is parsed, before any model loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import tokenflow_cli.cli.app  # noqa: F401  (registers the commands)
from tokenflow_cli.cli.common import app
from tokenflow_cli.generation.sampling import SamplingPass, parse_schedule

runner = CliRunner()


@pytest.mark.parametrize("args, named", [
    (["--p1", "3"], "--p1"),
    (["--p2", "-0.5"], "--p2"),
    (["--temperature", "0"], "--temperature"),
    (["--cfg", "-1"], "--cfg"),
    (["-n", "0"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_generate_rejects_out_of_range_values_at_parse_time(tmp_path, monkeypatch, args, named):
    monkeypatch.setenv("COLUMNS", "2000")
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", "a red fox", "-o", str(out), *args])
    assert res.exit_code == 2, res.output  # click's usage error
    assert named in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_top_p_must_be_a_probability_in_every_schedule_spelling():
    with pytest.raises(ValueError, match="top-p 3 is not a probability"):
        SamplingPass(100, 3.0)
    with pytest.raises(ValueError, match="bad pass '100:3'.*not a probability"):
        parse_schedule("1200:0.8,100:3")
    assert parse_schedule("600:0.6")[0] == SamplingPass(600, 0.6)
