"""The released t2i model's layout.

1. The folder the official code itself built and saved (tests/data/official/t2i, made by
   scripts/official_references.py with the official classes and `save_pretrained`), converted,
   gives the official sampler's greedy codes (one and two passes, cfg 7.5) and teacher-forced
   logits, which that script recorded by running the official `autoregressive_infer_cfg`.
2. A folder with exactly the keys of the 7B key table (tiny widths) converts.
3. A tiny random model in the official layout, saved as a hub-style folder (sharded safetensors
   with an index, and sharded .bin), gives our re-implementation of the official computation
   (t2i_reference.py) its guided logits at every sampler call of one-, two- and three-pass runs.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from t2i_reference import OfficialReference, TinyT2I, make_official_folder, official_state
from typer.testing import CliRunner

from tokenflow_cli.checkpoint import WEIGHTS_NAME, save_model
from tokenflow_cli.config import load_recipe
from tokenflow_cli.generation.convert import convert_t2i
from tokenflow_cli.generation.next_scale import teacher_inputs
from tokenflow_cli.generation.sampling import OFFICIAL_NEGATIVE_PROMPT, get_schedule, parse_schedule
from tokenflow_cli.generation.text_to_image import TextToImage
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import build_tokenizer

C = TinyT2I(text_vocab=60)
PROMPTS = ["a photo of a red circle", "two yellow triangles left of a blue square"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    recipe = load_recipe("tiny", TokenizerRecipe, ["model.quantizer.scales=[1,2,4,16]",
                                                   f"model.quantizer.codebook_size={C.codebook_size}"])
    tok = build_tokenizer(recipe.model).eval()
    save_model(tok, root / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    state = official_state(C)
    runs, reports = {}, {}
    for fmt, shards in (("safetensors", 2), ("bin", 3)):
        folder = make_official_folder(root / f"hub-{fmt}", C, state, fmt, shards)
        reports[fmt] = convert_t2i(folder, root / "tok", root / f"run-{fmt}")
        runs[fmt] = root / f"run-{fmt}"
    codebook = tok.lookup_codes(torch.arange(C.codebook_size))
    reference = OfficialReference(C, state, codebook, pad_id=reports["bin"].ids["pad"])
    return {"root": root, "tok": tok, "runs": runs, "reports": reports, "reference": reference, "state": state}


def _prompt_ids(world: dict, loaded, prompts: list[str]) -> torch.Tensor:
    return torch.tensor([world["reference"].prompt_ids(loaded.text_tokenizer, p) for p in prompts])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_conversion_maps_every_key_and_reads_the_ids(world: dict, fmt: str) -> None:
    report = world["reports"][fmt]
    assert report.weight_format == fmt and report.shards == (2 if fmt == "safetensors" else 3)
    assert report.official_keys == len(world["state"])
    assert report.ids["pad"] == C.text_vocab and report.ids["image_token_start"] == C.image_token_start
    assert report.ids["image_marker"] and max(report.ids["image_marker"]) < C.text_vocab
    assert {"image_token_start", "image_token_end", "lm_head.weight[:image_token_start]"} <= set(
        report.not_carried)
    loaded = TextToImage.from_pretrained(world["runs"][fmt])
    assert report.written_keys == len(loaded.model.state_dict())
    cfg = loaded.model.config
    assert (cfg.lm_arch, cfg.next_scale_input, cfg.multi_step, cfg.text_layout) == (
        "llama-qknorm-postnorm", "chained", "inplace", "official")
    assert (Path(world["runs"][fmt]) / "recipe.yaml").is_file()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_teacher_forced_image_logits_equal_the_reference(world: dict, fmt: str) -> None:
    loaded = TextToImage.from_pretrained(world["runs"][fmt])
    model, tok = loaded.model, world["tok"]
    text = loaded.prompts([*PROMPTS, ""])
    ids = _prompt_ids(world, loaded, [*PROMPTS, ""])
    assert torch.equal(text.ids_BT, ids[:, :-1])  # the last `<img>` id is our scale-0 position
    codes = torch.randint(0, C.codebook_size, (3, C.num_tokens), generator=torch.Generator().manual_seed(1))
    expected = world["reference"].image_logits(ids, codes)
    inputs = model.scale_inputs(tok, codes)
    with torch.no_grad():
        full = model(text, inputs).logits_BLK
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.stepwise_logits(text, inputs, use_cache=True), expected, rtol=0, atol=1e-5)


def _run_ours(world: dict, schedule: str, seed: int = 3, use_cache: bool = True):
    loaded = TextToImage.from_pretrained(world["runs"]["safetensors"])
    calls: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    text, negative = loaded.prompts(PROMPTS), loaded.prompts([OFFICIAL_NEGATIVE_PROMPT] * len(PROMPTS))
    codes = loaded.model.generate(world["tok"], text, negative, parse_schedule(schedule), cfg=7.5,
                                  generator=torch.Generator().manual_seed(seed), use_cache=use_cache, keep_ties=True,
                                  on_sample=lambda si, k, logits, drawn: calls.append((si, k, logits, drawn)))
    return loaded, codes, calls


@pytest.mark.parametrize("preset", ["one-pass", "two-pass", "three-pass"])
def test_guided_logits_of_every_sampler_call_equal_the_reference(world: dict, preset: str) -> None:
    schedule = ",".join(str(p) for p in get_schedule(preset))
    loaded, codes, calls = _run_ours(world, schedule)
    ids = _prompt_ids(world, loaded, PROMPTS)
    negative = _prompt_ids(world, loaded, [OFFICIAL_NEGATIVE_PROMPT] * len(PROMPTS))
    replay = iter(calls)

    def draw(si: int, pass_index: int, guided: torch.Tensor) -> torch.Tensor:
        our_si, our_pass, our_guided, drawn = next(replay)
        assert (our_si, our_pass) == (si, pass_index)
        torch.testing.assert_close(our_guided, guided, rtol=0, atol=1e-4 * (1 + guided.abs().amax().item()) / 10)
        return drawn

    expected = world["reference"].sample(ids, negative, 7.5, len(get_schedule(preset)), draw)
    assert next(replay, None) is None  # as many sampler calls as the official
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_greedy_runs_give_the_reference_codes(world: dict, passes: int) -> None:
    loaded, codes, _ = _run_ours(world, ",".join(["1:0"] * passes))
    ids = _prompt_ids(world, loaded, PROMPTS)
    negative = _prompt_ids(world, loaded, [OFFICIAL_NEGATIVE_PROMPT] * len(PROMPTS))
    expected = world["reference"].sample(ids, negative, 7.5, passes, lambda si, k, guided: guided.argmax(-1))
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("preset", ["one-pass", "three-pass"])
def test_cached_sampler_equals_recompute_all_in_the_official_layout(world: dict, preset: str) -> None:
    schedule = ",".join(str(p) for p in get_schedule(preset))
    _, cached, _ = _run_ours(world, schedule, seed=5)
    _, recomputed, _ = _run_ours(world, schedule, seed=5, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_incremental_var_inputs_equal_the_tokenizers(world: dict) -> None:
    tok = world["tok"]
    codes = torch.randint(0, C.codebook_size, (2, C.num_tokens), generator=torch.Generator().manual_seed(2))
    for ours, theirs in zip(teacher_inputs("var", tok, codes), tok.next_scale_inputs(codes), strict=True):
        assert torch.equal(ours, theirs)


def test_convert_and_generate_cli_use_the_official_settings(world: dict, tmp_path: Path) -> None:
    from tokenflow_cli.cli.app import app

    root = world["root"]
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["convert", str(root / "hub-bin"), "--tokenizer", str(root / "tok"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # Rich wraps at the runner's terminal width
    assert "image_token_start" in text and "not carried" in text
    images = tmp_path / "images"
    result = runner.invoke(app, ["generate", "a red fox", "--model", str(out), "--k1", "1200", "--k2", "100", "-n", "1",
                                 "-o", str(images), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "float32" in text and "cfg 7.5" in text and "ties kept" in text
    settings = json.loads((images / "settings.json").read_text())
    assert settings["cfg"] == 7.5 and settings["negative_prompt"] == OFFICIAL_NEGATIVE_PROMPT
    assert settings["schedule"] == "1200:0,100:0" and settings["keep_ties"] is True


# ------------------------------------------------------------------- the official code's own run

DATA = Path(__file__).resolve().parents[1] / "data"
OFFICIAL = DATA / "official"
OFFICIAL_PROMPTS = ["a photo of a red circle", "two yellow triangles left of a blue square"]  # the script's


@pytest.fixture(scope="module")
def official_run(tmp_path_factory) -> dict:
    """The official folder converted, with an image tokenizer holding the official codebooks (the
    t2i computation sees its tokenizer only through them and its scales)."""
    root = tmp_path_factory.mktemp("t2i_official")
    ref = dict(np.load(OFFICIAL / "t2i_reference.npz"))
    scales = [int(s) for s in ref["scales"]]
    recipe = load_recipe("tiny", TokenizerRecipe, [f"model.quantizer.scales={scales}",
                                                   f"model.quantizer.codebook_size={len(ref['codebook'])}"])
    tok = build_tokenizer(recipe.model).eval()
    codebook = torch.from_numpy(ref["codebook"])  # l2-normalised halves, as the official lookup returns
    with torch.no_grad():
        tok.quantizer.semantic_codebook.weight.copy_(codebook[:, :32])
        tok.quantizer.pixel_codebook.weight.copy_(codebook[:, 32:])
    torch.testing.assert_close(tok.lookup_codes(torch.arange(len(codebook))), codebook, atol=1e-6, rtol=0)
    save_model(tok, root / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    folder = shutil.copytree(OFFICIAL / "t2i", root / "hub")
    report = convert_t2i(folder, root / "tok", root / "run")
    return {"ref": ref, "report": report, "loaded": TextToImage.from_pretrained(root / "run"), "tok": tok}


def test_the_folder_the_official_code_saved_converts(official_run: dict) -> None:
    report, ref = official_run["report"], official_run["ref"]
    assert report.ids["image_token_start"] == int(ref["image_token_start"])
    assert {"image_token_start", "image_token_end"} <= set(report.not_carried)  # top-level, as saved
    assert report.config["codebook_size"] == 64  # the folder's vq_codebook_size


def test_official_prompt_ids_and_teacher_forced_logits(official_run: dict) -> None:
    loaded, ref = official_run["loaded"], official_run["ref"]
    text = loaded.prompts(OFFICIAL_PROMPTS)
    assert torch.equal(text.ids_BT, torch.from_numpy(ref["prompt_ids"])[:, :-1])  # last <img> id: our scale 0
    codes = torch.from_numpy(ref["teacher_codes"])
    with torch.no_grad():
        logits = loaded.model(text, loaded.model.scale_inputs(official_run["tok"], codes)).logits_BLK
    expected = torch.from_numpy(ref["teacher_logits"])
    torch.testing.assert_close(logits, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("passes", [1, 2])
def test_greedy_codes_equal_the_official_sampler(official_run: dict, passes: int) -> None:
    loaded, ref = official_run["loaded"], official_run["ref"]
    text = loaded.prompts(OFFICIAL_PROMPTS)
    negative = loaded.prompts([OFFICIAL_NEGATIVE_PROMPT] * len(OFFICIAL_PROMPTS))
    assert torch.equal(negative.ids_BT[0], torch.from_numpy(ref["negative_ids"])[:-1])
    codes = loaded.model.generate(official_run["tok"], text, negative, parse_schedule(",".join(["1:0"] * passes)),
                                  cfg=7.5, generator=torch.Generator().manual_seed(0), keep_ties=True)
    assert torch.equal(codes, torch.from_numpy(ref[f"greedy_codes_{passes}pass"]))


# -------------------------------------------------------------------- the 7B key table, tiny widths


def test_a_folder_with_exactly_the_7b_key_names_converts(tmp_path: Path) -> None:
    with open(DATA / "tokenflow_t2i_llama2_7b_keys.tsv") as fh:
        table = [row["key"] for row in csv.DictReader(fh, delimiter="\t")]
    c = TinyT2I(text_vocab=60, layers=32)  # the table's 32 layers, tiny widths
    torch.manual_seed(0)
    recipe = load_recipe("tiny", TokenizerRecipe, [f"model.quantizer.scales={list(c.scales)}",
                                                   f"model.quantizer.codebook_size={c.codebook_size}"])
    tok = build_tokenizer(recipe.model).eval()
    save_model(tok, tmp_path / "tok" / WEIGHTS_NAME, tok.config, kind="tokenizer")
    state = official_state(c)
    assert sorted(state) == sorted(table)  # the fixture holds the table's names, nothing else
    report = convert_t2i(make_official_folder(tmp_path / "hub", c, state, "safetensors"), tmp_path / "tok",
                         tmp_path / "run")
    assert report.official_keys == len(table) == 363
