"""`make demo` end to end on a very small budget (slow: trains for real)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_trains_evaluates_and_installs_the_default_tokenizer(tmp_path):
    from tokenflow_cli.cli import demo
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
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


@pytest.mark.parametrize("default_psnr, installed", [(30.0, False), (20.0, True), (None, True)])
def test_demo_installs_its_tokenizer_only_when_it_beats_the_default(tmp_path, monkeypatch, default_psnr, installed):
    from tokenflow_cli.cli import demo
    from tokenflow_cli.weights import DEFAULT_TOKENIZER, tokenflow_home

    monkeypatch.setenv("TOKENFLOW_HOME", str(tmp_path / "home"))  # the fake weights stay in this test
    trained = tmp_path / "trained.safetensors"
    trained.write_bytes(b"the demo's weights")
    shipped = tmp_path / "shipped.safetensors"
    monkeypatch.setattr(type(DEFAULT_TOKENIZER), "find", lambda self: None if default_psnr is None else shipped)
    monkeypatch.setattr(demo, "_held_out_psnr", lambda ctx, model, tag: default_psnr)
    ctx = demo.DemoContext(tmp_path / "demo", minutes=0.0, tokenizer_path=trained, held_out_psnr=25.0)
    demo.install_step(ctx)
    target = tokenflow_home() / DEFAULT_TOKENIZER.home_name / "model.safetensors"
    assert target.is_file() == installed
    assert ("kept the default tokenizer" in ctx.summary[-1]) != installed
    assert "25.00 dB" in ctx.summary[-1]


def test_demo_keeps_the_default_generator_when_it_scores_as_well(tmp_path, monkeypatch):
    from tokenflow_cli.cli import demo
    from tokenflow_cli.generation import geneval, text_to_image
    from tokenflow_cli.weights import DEFAULT_GENERATOR, tokenflow_home

    monkeypatch.setenv("TOKENFLOW_HOME", str(tmp_path / "home"))
    scores = iter([0.25, 0.25])  # the trained one, then the default: a tie keeps the default
    seeds = []

    def fake_geneval(loaded, settings, out_dir, n_per_tag, prompt_seed):
        seeds.append(prompt_seed)
        return {"overall": next(scores)}

    monkeypatch.setattr(geneval, "run_geneval", fake_geneval)
    monkeypatch.setattr(text_to_image, "resolve_generator", lambda path, device: "default generator")
    monkeypatch.setattr(type(DEFAULT_GENERATOR), "find", lambda self: tmp_path / "shipped-generator")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = demo.DemoContext(tmp_path / "demo", minutes=0.0)
    demo._install_generator_if_better(ctx, "trained generator", run_dir, settings=None)
    assert not (tokenflow_home() / DEFAULT_GENERATOR.home_name).exists()
    assert "kept the default generator" in ctx.summary[-1]
    assert seeds == [demo.SELECTION_PROMPT_SEED] * 2 and demo.SELECTION_PROMPT_SEED != 0  # not eval's prompts
