"""`generate --geneval METADATA`: GenEval's evaluator layout from a file in the official format
(tests/data/geneval_metadata_excerpt.jsonl, six lines of GenEval's own prompt file), resumable
and split over ranks with the same images; `eval geneval` uses the model's sampler defaults."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tokenflow_cli.checkpoint import WEIGHTS_NAME, save_model
from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.model import build_generator
from tokenflow_cli.generation.run_folder import save_generator
from tokenflow_cli.generation.sampling import get_schedule

METADATA = Path(__file__).parents[1] / "data" / "geneval_metadata_excerpt.jsonl"


@pytest.fixture(autouse=True)
def _no_default_generator(monkeypatch):
    monkeypatch.delenv("TOKENFLOW_GENERATOR", raising=False)


def _run(root: Path, sampler_defaults: str) -> Path:
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer

    if not (root / "tok" / WEIGHTS_NAME).is_file():
        torch.manual_seed(0)
        tok = build_tokenizer(load_recipe("tiny", TokenizerRecipe).model).eval()
        save_model(tok, root / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    text_tok = train_bpe_tokenizer([json.loads(line)["prompt"] for line in METADATA.read_text().splitlines()],
                                   vocab_size=300)
    cfg = GeneratorModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                               text_vocab_size=len(text_tok), max_text_tokens=12, scales=(1, 2, 4, 6, 8, 12, 16),
                               codebook_size=1024, code_dim=40, sampler_defaults=sampler_defaults)
    torch.manual_seed(1)
    save_generator(root / sampler_defaults, build_generator(cfg), text_tok, root / "tok")
    return root / sampler_defaults


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("geneval_runs")
    return {name: _run(root, name) for name in ("ours", "official")}


def _evaluator_reads(out: Path) -> list[tuple[dict, str]]:
    """GenEval's evaluation/evaluate_images.py main(), minus the detector: (metadata, image path)."""
    found = []
    for subfolder in os.listdir(out):
        folderpath = os.path.join(out, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            found.append((metadata, imagepath))
    return found


def test_generate_geneval_writes_the_official_layout(runs, tmp_path):
    from tokenflow_cli.cli.app import app
    from tokenflow_cli.data.captions import read_geneval_metadata
    from tokenflow_cli.generation.geneval_export import check_geneval_layout

    out = tmp_path / "geneval"
    result = CliRunner().invoke(app, ["generate", "--geneval", str(METADATA), "-o", str(out), "-n", "2", "-b", "4",
                                      "--model", str(runs["official"]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in METADATA.read_text().splitlines()]
    read = _evaluator_reads(out)
    assert len(read) == 2 * len(lines)
    for metadata, path in read:
        index = int(Path(path).parent.parent.name)
        assert metadata == lines[index] and Path(path).name in ("0000.png", "0001.png")
        assert Image.open(path).mode == "RGB"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(len(lines))]
    assert check_geneval_layout(out, read_geneval_metadata(METADATA), 2)["problems"] == []
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == 6 and settings["samples_per_prompt"] == 2
    # a converted official model samples with the official settings (run_t2i.sh: cfg 7.5, one pass 600/0.6)
    assert settings["settings"]["cfg"] == 7.5 and settings["settings"]["schedule"] == "600:0.6"
    assert settings["settings"]["negative_prompt"].startswith("lowres, bad anatomy")


def test_resume_and_ranks_give_the_same_images(runs, tmp_path):
    from tokenflow_cli.data.captions import read_geneval_metadata
    from tokenflow_cli.generation.geneval_export import export_geneval
    from tokenflow_cli.generation.text_to_image import TextToImage

    pipe = TextToImage.from_pretrained(runs["ours"])
    metadata = read_geneval_metadata(METADATA)[:4]
    settings = pipe.default_settings(schedule=get_schedule("one-pass"), samples_per_prompt=2, batch_size=4)
    whole = export_geneval(pipe, metadata, tmp_path / "one", settings)
    assert whole.generated == 4 and whole.reused == 0
    for rank in (1, 0):  # two ranks share the prompt groups
        export_geneval(pipe, metadata, tmp_path / "two", settings, rank=rank, world_size=2)
    victim = tmp_path / "two" / "00003" / "samples" / "0001.png"
    victim.unlink()  # a run killed while writing prompt 3
    again = export_geneval(pipe, metadata, tmp_path / "two", settings)
    assert again.generated == 2 and again.reused == 2  # prompt 3's group of two prompts only

    def pixels(root):
        return {p.relative_to(root): np.asarray(Image.open(p)) for p in sorted(root.glob("*/samples/*.png"))}

    one, two = pixels(tmp_path / "one"), pixels(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 8
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert not np.array_equal(one[Path("00000/samples/0000.png")], one[Path("00000/samples/0001.png")])


def test_other_settings_in_the_output_are_refused(runs, tmp_path, cli_error):
    from tokenflow_cli.cli.app import app

    out, two = tmp_path / "g", tmp_path / "two.jsonl"
    two.write_text("".join(line + "\n" for line in METADATA.read_text().splitlines()[:2]))
    base = ["generate", "--geneval", str(two), "-o", str(out), "--model", str(runs["ours"]), "--device", "cpu",
            "-b", "8"]
    assert CliRunner().invoke(app, [*base, "-n", "1"]).exit_code == 0
    cli_error(CliRunner().invoke(app, [*base, "-n", "2"]), "samples_per_prompt", "settings", code=1)


def test_a_line_without_geneval_fields_is_named(tmp_path, cli_error):
    from tokenflow_cli.cli.app import app

    bad = tmp_path / "meta.jsonl"
    bad.write_text(METADATA.read_text().splitlines()[0] + '\n{"prompt": "a photo of a cat"}\n')
    result = CliRunner().invoke(app, ["generate", "--geneval", str(bad), "-o", str(tmp_path / "o")])
    cli_error(result, f"{bad}:2", "tag", "include")


def test_eval_geneval_uses_the_models_sampler_defaults(runs, tmp_path):
    from tokenflow_cli.cli.app import app

    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", "geneval", "--model", str(runs["official"]), "--per-tag", "1",
                                      "--samples", "1", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    (name, run), = report["schedules"].items()
    assert name == "one-pass" and run["settings"]["cfg"] == 7.5 and run["settings"]["keep_ties"] is True
    assert run["settings"]["negative_prompt"].startswith("lowres")
