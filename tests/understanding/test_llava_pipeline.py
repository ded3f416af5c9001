"""Understanding pipeline on the shapes world: data, feature sources, scoring, `ask`, `eval vqa`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tokenflow_cli.understanding.conversation import IGNORE_INDEX
from tokenflow_cli.understanding.vqa import VqaItem, load_vqa_items, normalize_answer, score_vqa


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tokenflow_cli.data.shapes import render_shapes_world

    out = tmp_path_factory.mktemp("shapes")
    render_shapes_world(out, 6, seed=0, size=64, llava=True)
    return out


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    from tokenflow_cli.checkpoint import save_model
    from tokenflow_cli.config import load_recipe
    from tokenflow_cli.tokenizer.config import TokenizerRecipe
    from tokenflow_cli.tokenizer.model import build_tokenizer

    torch.manual_seed(0)
    cfg = load_recipe("tiny", TokenizerRecipe).model
    path = tmp_path_factory.mktemp("tok") / "model.safetensors"
    save_model(build_tokenizer(cfg), path, cfg, kind="tokenizer")
    return path


@pytest.fixture(scope="module")
def saved_model(world, tokenizer_ckpt, tmp_path_factory):
    """A (briefly trained) tiny understanding model saved with its tokenizer reference."""
    from tokenflow_cli.tokenizer.model import load_tokenizer
    from tokenflow_cli.understanding.build import build_llava
    from tokenflow_cli.understanding.config import LlavaModelConfig, TinyLMConfig
    from tokenflow_cli.understanding.data import conversation_texts, read_records

    records = read_records(world / "llava.json")
    source_tok = load_tokenizer(tokenizer_ckpt)
    lm = TinyLMConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=320,
        vocab_size=300,
    )
    torch.manual_seed(0)
    model = build_llava(
        LlavaModelConfig(tiny_llm=lm, chat_template="plain"),
        source_tok.code_dim,
        source_tok.grid**2,
        conversation_texts(records),
    )
    out = tmp_path_factory.mktemp("llava") / "model"
    model.save_pretrained(out, extra={"tokenizer_source": str(tokenizer_ckpt)})
    return out, records


def test_normalize_answer() -> None:
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("Yes, there is a red circle") == "yes"
    assert normalize_answer("The  Top-Left") == "top left"
    assert normalize_answer("a star") == normalize_answer("star")


def test_score_vqa_per_type_and_mme_acc_plus() -> None:
    items = [
        VqaItem("a.png", "q", "yes", "exists"),
        VqaItem("a.png", "q", "no", "relation"),
        VqaItem("b.png", "q", "no", "exists"),
        VqaItem("b.png", "q", "yes", "relation"),
        VqaItem("b.png", "q", "red", "color"),
    ]
    report = score_vqa(items, ["Yes.", "no", "yes", "yes", "Red"])
    assert report["accuracy"] == pytest.approx(4 / 5)
    assert report["per_type"]["exists"] == {"n": 2, "accuracy": 0.5}
    assert report["per_type"]["color"]["accuracy"] == 1.0
    yn = report["yes_no"]
    assert yn["accuracy"] == pytest.approx(3 / 4) and yn["images"] == 2
    assert yn["accuracy_plus"] == pytest.approx(1 / 2)  # b.png has one wrong answer
    assert yn["yes_ratio"] == pytest.approx(3 / 4)


def test_question_sets_load_from_both_formats(world) -> None:
    flat = load_vqa_items(world / "vqa.jsonl")
    llava = load_vqa_items(world / "llava.json")
    # llava.json spells "colour" in about half of the colour questions (data.captions.export_llava)
    assert [(i.question, i.answer, i.image) for i in flat] == [
        (i.question.replace("colour", "color"), i.answer, i.image) for i in llava]
    assert {i.type for i in flat} >= {"count", "color", "exists"} and all(i.image.is_file() for i in flat)


def test_padded_batch_matches_single_samples(saved_model) -> None:
    from tokenflow_cli.understanding.data import ConversationDataset, collate_conversations
    from tokenflow_cli.understanding.model import LlavaModel

    out, records = saved_model
    model = LlavaModel.from_pretrained(out).eval()
    data = ConversationDataset(records[:3], model.formatter, model.num_visual_tokens, 64, max_length=320)
    items = [data[i] for i in range(3)]
    batch = collate_conversations(items, model.text_tokenizer.pad_token_id)
    assert batch["images"].shape == (3, 3, 64, 64) and batch["images"].abs().max() <= 1
    vis_BNC = torch.randn(3, model.num_visual_tokens, model.feature_dim)
    with torch.no_grad():
        logits_BTV = model(batch["input_ids"], batch["attention_mask"], vis_BNC).logits
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            single = model(item["input_ids"][None], None, vis_BNC[b : b + 1]).logits[0]
            torch.testing.assert_close(logits_BTV[b, :n], single, atol=1e-5, rtol=1e-4)
            assert (batch["labels"][b, n:] == IGNORE_INDEX).all()


def test_feature_sources_of_a_tiny_tokenizer(tokenizer_ckpt) -> None:
    from tokenflow_cli.tokenizer.model import load_tokenizer
    from tokenflow_cli.understanding.features import build_feature_source

    tok = load_tokenizer(tokenizer_ckpt)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    full = build_feature_source(tok, "tokenflow")
    sem, pix = build_feature_source(tok, "semantic"), build_feature_source(tok, "pixel")
    assert (full.num_tokens, full.feature_dim, sem.feature_dim, pix.feature_dim) == (256, 40, 32, 8)
    f_BNC = full(img)
    torch.testing.assert_close(f_BNC, torch.cat([sem(img), pix(img)], dim=-1))
    # one token per final-grid position, row-major: token r*16+c is map position (r, c)
    f_BChw = tok.codes_to_features(tok.img_to_codes(img))
    torch.testing.assert_close(f_BNC[:, 16 * 3 + 5], f_BChw[:, :, 3, 5])
    teacher = build_feature_source(tok, "teacher")
    assert teacher(img).shape == (2, teacher.num_tokens, tok.config.teacher.dim)
    full.train()
    assert not full.training and not any(p.requires_grad for p in full.parameters())


def test_ask_and_eval_vqa_cli(saved_model, world, tmp_path) -> None:
    from tokenflow_cli.cli.app import app
    from tokenflow_cli.understanding.pipeline import Understanding

    out, _ = saved_model
    image = world / "images" / "000000.png"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "ask",
            str(image),
            "What color is the star?",
            "--model",
            str(out),
            "--json",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    loaded = Understanding.from_pretrained(out, device=torch.device("cpu"))
    expected = loaded.model.answer(loaded.visual_tokens([image]), ["What color is the star?"], max_new_tokens=4)
    assert record["answer"] == expected[0] and record["features"] == "tokenflow"

    streamed = runner.invoke(
        app,
        ["ask", str(image), "What color is the star?", "--model", str(out), "--max-new-tokens", "4", "--device", "cpu"],
    )
    assert streamed.exit_code == 0 and streamed.stdout.strip() == expected[0].strip()

    res = runner.invoke(
        app,
        [
            "eval",
            "vqa",
            "--data",
            str(world / "vqa.jsonl"),
            "--model",
            str(out),
            "-o",
            str(tmp_path / "ev"),
            "--limit",
            "12",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n"] == 12 and sum(t["n"] for t in report["per_type"].values()) == 12
    predictions = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12
