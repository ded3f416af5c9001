"""Generator run folders, `generate`, GenEval scoring/layout and `train-generator` (tiny, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tokenflow_cli.checkpoint import WEIGHTS_NAME, save_model
from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.data import CaptionedCodes, match_captions
from tokenflow_cli.generation.geneval import export_geneval_layout, relative_position, score_detections, summarize
from tokenflow_cli.generation.model import build_generator
from tokenflow_cli.generation.prompts import PromptEncoder
from tokenflow_cli.generation.run_folder import save_generator
from tokenflow_cli.generation.sampling import get_schedule
from tokenflow_cli.generation.text_to_image import TextToImage

TEXTS = ["a photo of a red circle", "a photo of two blue squares", "a green star left of a yellow triangle"]


@pytest.fixture(autouse=True)
def _no_default_generator(monkeypatch):
    monkeypatch.delenv("TOKENFLOW_GENERATOR", raising=False)


def _gen_config(vocab: int) -> GeneratorModelConfig:
    return GeneratorModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                                text_vocab_size=vocab, max_text_tokens=8, scales=(1, 2, 4, 6, 8, 12, 16),
                                codebook_size=1024, code_dim=40)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer

    root = tmp_path_factory.mktemp("gen_run")
    torch.manual_seed(0)
    tok = build_tokenizer(load_recipe("tiny", TokenizerRecipe).model).eval()
    save_model(tok, root / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    text_tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(1)
    model = build_generator(_gen_config(len(text_tok)))
    save_generator(root / "run", model, text_tok, root / "tok")
    return root / "run"


def test_prompt_encoder_left_pads_with_bos_and_truncates() -> None:
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    enc = PromptEncoder(tok, max_tokens=4)
    batch = enc(["a photo of a red circle", ""])
    assert batch.ids_BT.shape == (2, 4)
    assert batch.mask_BT.tolist()[1] == [0, 0, 0, 1]
    assert batch.ids_BT[1, -1] == tok.bos_token_id and batch.ids_BT[0, 0] == tok.bos_token_id
    assert batch.ids_BT[0, 1:].tolist() == tok("a photo of a red circle", add_special_tokens=False)["input_ids"][:3]


def test_run_folder_round_trip(run_dir: Path) -> None:
    a = TextToImage.from_pretrained(run_dir)
    b = TextToImage.from_pretrained(run_dir)
    assert a.tokenizer_source.endswith("image_tokenizer.safetensors")  # the copy travels with the run
    text = a.prompts(TEXTS[:2])
    codes = [m.model.generate(m.tokenizer, text, a.prompts(["", ""]), get_schedule("two-pass"), 2.0,
                              generator=torch.Generator().manual_seed(3)) for m in (a, b)]
    assert torch.equal(codes[0], codes[1])
    # a checkpoint folder inside the run loads too (the loop writes checkpoints/step-N/)
    step = run_dir / "checkpoints" / "step-00000001"
    step.mkdir(parents=True, exist_ok=True)
    (step / WEIGHTS_NAME).write_bytes((run_dir / WEIGHTS_NAME).read_bytes())
    c = TextToImage.from_pretrained(step)
    for (name, p), q in zip(a.model.state_dict().items(), c.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_generate_cli_writes_reproducible_outputs(run_dir: Path, tmp_path: Path, cli_error) -> None:
    from tokenflow_cli.cli.app import app

    runner = CliRunner()
    args = ["generate", "a red circle", "--k1", "1200", "--k2", "100", "-n", "2", "--model", str(run_dir),
            "--device", "cpu"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["passes"] == [{"top_k": 1200, "top_p": 0.0}, {"top_k": 100, "top_p": 0.0}]
    assert [r["prompt"] for r in settings["images"]] == ["a red circle"] * 2
    for name in ("00000.png", "00001.png", "grid.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert Image.open(tmp_path / "a" / "00000.png").size == (64, 64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na blue square\n\na star\n")
    many = runner.invoke(app, ["generate", "--prompts", str(prompts), "-n", "1", "--preset", "one-pass", "-b", "1",
                               "--model", str(run_dir), "--device", "cpu", "-o", str(tmp_path / "c")])
    assert many.exit_code == 0, many.output
    assert len(list((tmp_path / "c").glob("0000*.png"))) == 2
    clash = runner.invoke(app, ["generate", "x", "--preset", "two-pass", "--k1", "5", "--model", str(run_dir)])
    assert clash.exit_code != 0
    cli_error(clash, "--preset", "--k1", code=1)


def test_geneval_rules() -> None:
    def det(shape, color, x, y, side=10.0):
        return {"shape": shape, "color": color, "bbox": [x, y, x + side, y + side], "area": side * side}

    left = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert score_detections([det("circle", "red", 5, 30), det("square", "blue", 40, 30)], left)[0]
    assert not score_detections([det("circle", "red", 40, 30), det("square", "blue", 5, 30)], left)[0]
    assert relative_position([0, 0, 10, 10], [11, 0, 21, 10]) == {"left of"}
    assert relative_position([0, 0, 10, 10], [1, 0, 11, 10]) == set()  # inside the dead zone
    colors = {"tag": "color_attr", "include": [{"class": "star", "count": 1, "color": "green"},
                                               {"class": "square", "count": 1, "color": "red"}]}
    assert score_detections([det("star", "green", 0, 0), det("square", "red", 30, 30)], colors)[0]
    assert not score_detections([det("star", "red", 0, 0), det("square", "green", 30, 30)], colors)[0]
    count = {"tag": "counting", "include": [{"class": "star", "count": 2}], "exclude": [{"class": "star", "count": 3}]}
    assert score_detections([det("star", "red", 0, 0), det("star", "red", 30, 0)], count)[0]
    assert not score_detections([det("star", "red", 0, 0)], count)[0]
    assert not score_detections([det("star", "red", x, 0) for x in (0, 20, 40)], count)[0]
    report = summarize([{"tag": "a", "correct": True}, {"tag": "a", "correct": False}, {"tag": "b", "correct": True}])
    assert report["per_tag"] == {"a": 0.5, "b": 1.0} and report["overall"] == 0.75


def test_detector_scores_ground_truth_renders_correct(tmp_path: Path) -> None:
    from tokenflow_cli.data.captions import read_jsonl
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.generation.geneval import score_images

    render_shapes_world(tmp_path, n=18, seed=4, size=64)
    records = read_jsonl(tmp_path / "geneval.jsonl")
    images = [np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")) for r in records]
    meta = [{k: r[k] for k in ("tag", "include", "exclude", "prompt") if k in r} for r in records]
    scored = score_images(images, meta)
    assert sum(r["correct"] for r in scored) >= 17, [r["reasons"] for r in scored if not r["correct"]]


def test_geneval_layout_matches_the_spec(tmp_path: Path) -> None:
    meta = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
            {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "red"}],
             "prompt": "a photo of a red star"}]
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    export_geneval_layout(tmp_path, meta, images, samples_per_prompt=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000", "00001"]
    for i, m in enumerate(meta):
        folder = tmp_path / f"{i:05d}"
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0]) == m
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
        assert np.array_equal(np.asarray(Image.open(folder / "samples" / "0002.png")), images[i * 3 + 2])
    with pytest.raises(ValueError):
        export_geneval_layout(tmp_path, meta, images[:5], samples_per_prompt=3)


def test_caption_matching_and_dropout() -> None:
    table = {Path("/d/images/a.png"): ["cap a"], Path("/d/images/b.png"): ["cap b", "prompt b"]}
    rows, caps = match_captions(["/d/images/b.png", "/elsewhere/a.png", "/x/c.png"], table)
    assert rows == [0, 1] and caps == [["cap b", "prompt b"], ["cap a"]]
    data = CaptionedCodes(np.zeros((1, 5), np.int32), [["x", "y"]], caption_dropout=0.25, negative_prompts=("bad",))
    seen = []
    for seed in range(400):
        torch.manual_seed(seed)
        seen.append(data[0]["caption"])
    share = {c: seen.count(c) / len(seen) for c in set(seen)}
    assert set(share) == {"x", "y", "bad"} and abs(share["bad"] - 0.25) < 0.07


@pytest.mark.parametrize("source", ["codes", pytest.param("images", marks=pytest.mark.slow)])
def test_train_generator_cli_makes_a_loadable_run(run_dir: Path, tmp_path: Path, source: str) -> None:
    from tokenflow_cli.cli.app import app
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths

    render_shapes_world(tmp_path / "shapes", n=6, seed=0, size=64)
    tok_dir = run_dir.parent / "tok"
    if source == "codes":
        resolved = resolve_tokenizer(str(tok_dir), torch.device("cpu"))
        tokenize_paths(resolved, sorted((tmp_path / "shapes" / "images").glob("*.png")), tmp_path / "codes.npz")
        data = [f"data.codes={tmp_path / 'codes.npz'}"]
    else:
        data = [f"data.images={tmp_path / 'shapes' / 'images'}"]
    sets = [*data, f"data.captions={tmp_path / 'shapes' / 'captions.jsonl'}", f"data.tokenizer={tok_dir}",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=64", "train.steps=2", "train.batch_size=3", "train.log_every=1",
            "train.eval_every=2", "train.warmup_steps=0", "model.refine_prob=1.0"]
    args = ["train-generator", "generator-tiny", "-o", str(tmp_path / "run"), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2 and {"acc@1", "acc@16", "refine_nll", "nll"} <= set(train_rows[0])
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file()
    loaded = TextToImage.from_pretrained(tmp_path / "run")
    assert loaded.model.config.hidden_size == 32 and len(loaded.text_tokenizer) > 256
    codes = loaded.model.generate(loaded.tokenizer, loaded.prompts(["a photo of a circle"]), None,
                                  get_schedule("one-pass"), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, 521)


def test_eval_geneval_cli_compares_schedules(run_dir: Path, tmp_path: Path) -> None:
    from tokenflow_cli.cli.app import app

    args = ["eval", "geneval", "--model", str(run_dir), "--per-tag", "1", "--samples", "1",
            "--schedules", "one-pass,1200:0.8;1:0", "-o", str(tmp_path), "--device", "cpu", "-b", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["schedules"]) == {"one-pass", "1200:0.8,1:0"}
    one = report["schedules"]["one-pass"]
    assert set(one["per_tag"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert one["images"] == one["prompts"] == 6 and 0.0 <= one["overall"] <= 1.0
    assert len(list((tmp_path / "one-pass" / "geneval").glob("*/samples/0000.png"))) == 6
    assert len((tmp_path / "one-pass" / "records.jsonl").read_text().splitlines()) == 6
    ceiling = report["detector_on_real_images"]  # the detector on real renders at the model's size
    assert ceiling["images"] == 300 and ceiling["overall"] > 0.8


def test_train_generator_takes_the_tokenizer_from_its_codes(run_dir: Path, tmp_path: Path, tiny_recipe,
                                                            cli_error) -> None:
    """No data.tokenizer: the codes' own tokenizer is used; a different one named is refused."""
    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.cli.app import app
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.tokenizer.model import build_tokenizer
    from tokenflow_cli.tokenizer.resolve import resolve_tokenizer
    from tokenflow_cli.tokenizer.tokenize import tokenize_paths

    render_shapes_world(tmp_path / "shapes", n=6, seed=0, size=64)
    resolved = resolve_tokenizer(str(run_dir.parent / "tok"), torch.device("cpu"))
    tokenize_paths(resolved, sorted((tmp_path / "shapes" / "images").glob("*.png")), tmp_path / "codes.npz")
    torch.manual_seed(7)
    other = tmp_path / "other" / "model.safetensors"
    save_model(build_tokenizer(tiny_recipe.model), other, tiny_recipe.model)
    sets = [f"data.codes={tmp_path / 'codes.npz'}", f"data.captions={tmp_path / 'shapes' / 'captions.jsonl'}",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=64", "train.steps=1", "train.batch_size=3", "train.eval_every=0"]
    args = ["train-generator", "generator-tiny", "--device", "cpu", *[x for s in sets for x in ("--set", s)]]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "run" / "generator.json").read_text())
    assert sidecar["image_tokenizer"] == str(Path(resolved.source).resolve())
    refused = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "run2"), "--set", f"data.tokenizer={other}"])
    cli_error(refused, tmp_path / "codes.npz", other, code=1)
