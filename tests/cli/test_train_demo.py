"""`make demo` end to end on a very small budget (slow: trains for real)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_trains_evaluates_and_installs_the_default_tokenizer(tmp_path):
    from tokenflow_cli.cli import demo
    from tokenflow_cli.tokenizer.pipeline import resolve_tokenizer
    from tokenflow_cli.weights import DEFAULT_TOKENIZER

    ctx = demo.DemoContext(tmp_path / "demo", minutes=0.2, n_shapes=40, n_natural=20, n_val=4)
    for step in demo.DEMO_STEPS:
        step(ctx)
    text = "\n".join(ctx.summary)
    assert "shapes_val: PSNR" in text and "natural_val: PSNR" in text and "installed" in text
    assert DEFAULT_TOKENIZER.find() == DEFAULT_TOKENIZER.candidates()[0]
    import torch

    assert not resolve_tokenizer(None, torch.device("cpu")).random_init
    assert (tmp_path / "demo" / "recon_shapes_val" / "grid.png").is_file()
