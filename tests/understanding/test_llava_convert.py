"""The released LLaVA layout converts and runs as the official model does: a tiny
`LlavaQwenForCausalLM`-layout hub folder (safetensors shards + index, or .bin shards + index)
converted with `convert_llava` gives the reference's next-token logits (1e-5, fp32) and its
greedy answer (see official_llava_reference.py for what the reference does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import official_llava_reference as ref  # noqa: E402

from tokenflow_cli.tokenizer.convert import ConversionError  # noqa: E402
from tokenflow_cli.understanding.convert import VOCAB_ROWS, convert_llava, is_llava_folder  # noqa: E402

QUESTION = "What color is the star?"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Image tokenizer checkpoint, text tokenizer, official config and state, one image."""
    from PIL import Image

    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer

    root = tmp_path_factory.mktemp("llava_world")
    torch.manual_seed(0)
    cfg = load_recipe("tiny", TokenizerRecipe).model
    tok = build_tokenizer(cfg).eval()
    save_model(tok, root / "tok.safetensors", cfg, kind="tokenizer")
    text = ref.build_text_tokenizer(root / "text_tokenizer")
    config = ref.official_config(len(text) + 8, tok.code_dim)  # padded rows, as Qwen2.5's 152064
    sd = tok.state_dict()
    codebooks = (sd["quantizer.semantic_codebook.weight"], sd["quantizer.pixel_codebook.weight"])
    state = ref.official_state(config)
    image = root / "image.png"
    gen = torch.Generator().manual_seed(1)
    pixels = (torch.rand(48, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()  # not square: padded
    Image.fromarray(pixels).save(image)
    return {
        "root": root,
        "tok": tok,
        "text": text,
        "config": config,
        "state": state,
        "image": image,
        "codebooks": codebooks,
    }


def _convert(world, layout: str, name: str, state: dict | None = None, tokenizer: Path | None = None, **kw):
    src = ref.write_official_folder(
        world["root"] / f"src-{name}",
        state or world["state"],
        world["config"],
        world["root"] / "text_tokenizer",
        layout,
    )
    out = world["root"] / f"out-{name}"
    return src, out, convert_llava(src, tokenizer or world["root"] / "tok.safetensors", out, **kw)


@pytest.fixture(scope="module")
def converted(world):
    return _convert(world, "safetensors", "st")


def _reference_inputs(world, model_features):
    """(official prompt ids, reference features) for the test image."""
    from tokenflow_cli.understanding.data import load_llava_image

    tok = world["tok"]
    img = load_llava_image(world["image"], tok.image_size)[None]
    idx_BL = tok.img_to_codes(img).indices  # the tokenizer's indices are proven by its own tests
    features = ref.reference_features(world["codebooks"], idx_BL, list(tok.scales), tok.grid)[0]
    torch.testing.assert_close(model_features[0], features, atol=1e-6, rtol=0)
    return ref.reference_prompt_ids(world["text"], QUESTION), features


def test_a_llava_folder_is_detected(converted, world):
    src, out, _ = converted
    assert is_llava_folder(src) and not is_llava_folder(out) and not is_llava_folder(world["root"])


def test_conversion_maps_every_key_and_reads_the_ids(converted, world):
    src, out, report = converted
    assert (report.lm_keys, report.projector_keys, report.shards_read, report.shards_written) == (27, 4, 3, 2)
    assert report.image_tokenizer.startswith("given: ") and not report.not_carried
    text = world["text"]
    assert report.ids["<|im_start|>"] == text.convert_tokens_to_ids("<|im_start|>")
    assert report.ids["<image>"] == len(text)
    assert report.dtype == "float32"
    lm = {}
    for shard in out.glob("model-*.safetensors"):
        lm |= load_file(shard)
    rows = report.ids["embedding_rows"]  # cut to the tokenizer's ids, as the official loader does
    assert rows == len(world["text"]) < world["config"]["vocab_size"]
    for key, value in lm.items():
        assert torch.equal(value, world["state"][key][:rows] if key in VOCAB_ROWS else world["state"][key])
    assert set(lm) | {f"model.mm_projector.{k}" for k in load_file(out / "projector.safetensors")} == {
        k for k in world["state"] if "vision_tower" not in k
    }
    info = json.loads((out / "llava.json").read_text())
    assert info["config"]["chat_template"] == "qwen_2_5" and info["num_visual_tokens"] == 256
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"


def test_bin_shards_convert_to_the_same_model(converted, world):
    _, out_st, _ = converted
    _, out_bin, report = _convert(world, "bin", "bin")
    assert report.weights_format == "bin"
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "projector.safetensors"):
        a, b = load_file(out_st / name), load_file(out_bin / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converted_model_gives_the_official_logits_and_greedy_answer(converted, world):
    from tokenflow_cli.understanding.pipeline import Understanding

    _, out, _ = converted
    loaded = Understanding.from_pretrained(out, device=torch.device("cpu"), dtype="fp32")
    model = loaded.model
    visual_1NC = loaded.visual_tokens([world["image"]])
    ids, features = _reference_inputs(world, visual_1NC)
    ours_ids, mask = model.prompt_batch([QUESTION])
    n = model.num_visual_tokens
    at = ids.index(-200)
    assert ours_ids[0].tolist() == ids[:at] + [model.image_token_id] * n + ids[at + 1 :]
    rows = len(world["text"])  # the official loader: resize_token_embeddings(len(tokenizer))
    state = {k: v[:rows] if k in VOCAB_ROWS else v for k, v in world["state"].items()}
    with torch.no_grad():
        ours = model(ours_ids, mask, visual_1NC).logits[0].float()
        theirs = ref.llava_logits(state, world["config"], ids, features)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    stop = world["text"].convert_tokens_to_ids("<|im_end|>")
    expected = ref.greedy_answer(state, world["config"], ids, features, stop, n=8)
    steps = list(model.generate_ids(ours_ids, mask, visual_1NC, max_new_tokens=8))
    got = [int(s[0]) for s in steps]
    assert len(expected) > 0 and got[: len(expected)] == expected
    assert got[len(expected) :] == ([stop] if len(expected) < 8 else [])  # and stops where it stops
    assert (
        model.answer(visual_1NC, [QUESTION], max_new_tokens=8)[0]
        == world["text"].decode(expected, skip_special_tokens=True).strip()
    )


def test_ask_prints_model_dtype_and_settings(converted, world):
    from tokenflow_cli.cli.app import app

    _, out, _ = converted
    args = ["ask", str(world["image"]), QUESTION, "--model", str(out), "--max-new-tokens", "2", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--json", "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["dtype"] == "bf16" and record["template"] == "qwen_2_5" and record["visual_tokens"] == 256
    assert record["model"] == str(out) and record["llm"] == "qwen2" and record["answer"] is not None
    assert "dtype bf16" in res.stderr and "template qwen_2_5" in res.stderr and str(out) in res.stderr


def test_bf16_release_stays_bf16(world):
    state = {k: v.to(torch.bfloat16) for k, v in world["state"].items()}
    _, out, report = _convert(world, "safetensors", "bf16", state=state)
    assert report.dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model-00001-of-00002.safetensors").values())
    info = json.loads((out / "llava.json").read_text())
    assert info["config"]["llm_dtype"] == "bf16"
    _, out32, report32 = _convert(world, "safetensors", "bf16-to-32", state=state, dtype="float32")
    assert report32.dtype == "float32"


def test_a_wrong_shape_an_unknown_key_and_a_missing_key_are_all_listed(world):
    state = dict(world["state"])
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    state["model.extra_head.weight"] = torch.zeros(2)
    del state["model.layers.1.input_layernorm.weight"]
    with pytest.raises(ConversionError) as info:
        _convert(world, "safetensors", "broken", state=state)
    message = str(info.value)
    assert "model.layers.0.mlp.up_proj.weight" in message and "[7, 64]" in message
    assert "model.extra_head.weight" in message and "missing: model.layers.1.input_layernorm.weight" in message
    assert not (world["root"] / "out-broken").exists()


def test_a_folder_without_a_tokenizer_copy_needs_one_given(converted, tmp_path):
    src, _, _ = converted
    with pytest.raises(ConversionError, match="holds no copy of its image tokenizer"):
        convert_llava(src, None, tmp_path / "out")


def test_a_missing_shard_is_one_line_naming_it(converted, world, tmp_path):
    from tokenflow_cli.hub import HubFolderError

    src, _, _ = converted
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in src.iterdir():
        if file.name != "model-00002-of-00003.safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    with pytest.raises(HubFolderError, match="model-00002-of-00003.safetensors not found"):
        convert_llava(broken, world["root"] / "tok.safetensors", tmp_path / "out")


def test_features_upsampled_to_27_match_the_official_formula(world):
    from tokenflow_cli.understanding.features import build_feature_source

    tok = world["tok"]
    img = torch.rand(2, 3, tok.image_size, tok.image_size) * 2 - 1
    source = build_feature_source(tok, "tokenflow", grid=27)
    assert (source.num_tokens, source.feature_dim) == (729, 40)
    expected = ref.reference_features(world["codebooks"], tok.img_to_codes(img).indices, list(tok.scales), 27)
    torch.testing.assert_close(source(img), expected, atol=1e-6, rtol=0)


def test_qwen_template_renders_the_official_prompt(converted):
    from tokenflow_cli.understanding.model import LlavaModel

    _, out, _ = converted
    model = LlavaModel.from_pretrained(out)
    turns = [{"from": "human", "value": f"{QUESTION}\n<image>"}]
    assert model.formatter.render(turns) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = [*turns, {"from": "gpt", "value": "Red."}]
    tokenized = model.formatter.tokenize(answer, num_image_tokens=3)
    trained = [t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != -100]
    assert model.text_tokenizer.decode(trained) == "Red.<|im_end|>\n"


def test_an_official_tokenizer_pt_is_converted_into_the_folder(world, monkeypatch):
    import tokenflow_cli.understanding.convert as convert_module
    from tokenflow_cli.understanding.pipeline import Understanding

    official_pt = world["root"] / "tokenflow_tiny.pt"
    official_pt.write_bytes(b"stands for an official checkpoint")
    calls = []

    def fake_convert(source, output, **kw):  # the tokenizer converter has its own tests
        calls.append(Path(source))
        Path(output).write_bytes((world["root"] / "tok.safetensors").read_bytes())

    monkeypatch.setattr(convert_module, "convert_checkpoint", fake_convert)
    _, out, _ = _convert(world, "safetensors", "from-pt", tokenizer=official_pt)
    assert calls == [official_pt]
    info = json.loads((out / "llava.json").read_text())
    assert info["tokenizer_source"] == "given_tokenizer.safetensors"
    moved = world["root"] / "moved-llava"
    out.rename(moved)  # the folder carries its tokenizer: it still loads after a move
    loaded = Understanding.from_pretrained(moved, device=torch.device("cpu"))
    assert loaded.tokenizer_source == str(moved / "given_tokenizer.safetensors") and not loaded.warnings


def test_finetune_llava_continues_from_the_converted_model(converted, world, tmp_path):
    import dataclasses

    from tokenflow_cli.config import TrainConfig
    from tokenflow_cli.data.shapes import render_shapes_world
    from tokenflow_cli.understanding.config import LlavaDataConfig, LlavaModelConfig, LlavaRecipe
    from tokenflow_cli.understanding.stage import finetune_llava

    _, out, _ = converted
    render_shapes_world(tmp_path / "shapes", 4, seed=0, size=64, llava=True)
    recipe = LlavaRecipe(
        model=LlavaModelConfig(
            tokenizer=str(world["root"] / "tok.safetensors"),
            init=str(out),
            chat_template="qwen_2_5",
            system_prompt=ref.SYSTEM,
            max_length=1024,
        ),
        data=LlavaDataConfig(train=str(tmp_path / "shapes" / "llava.json")),
        train=TrainConfig(steps=1, batch_size=2, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0, seed=0),
    )
    result, final = finetune_llava(recipe, 2, tmp_path / "run", device="cpu", live=False)
    assert result.step == 1 and torch.isfinite(torch.tensor(result.history[-1]["loss"]))
    before = load_file(out / "model-00001-of-00002.safetensors")["model.embed_tokens.weight"]
    after = load_file(final / "model.safetensors")["model.embed_tokens.weight"]
    assert before.shape == after.shape and not torch.equal(before, after)  # stage 2 trains the LM
    assert json.loads((final / "llava.json").read_text())["config"]["chat_template"] == "qwen_2_5"
    assert dataclasses.asdict(recipe.model)["feature_grid"] == 0
