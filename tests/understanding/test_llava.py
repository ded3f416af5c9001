"""Understanding model: placeholder replacement, label masks, generation, save/load, stages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenflow_cli.config import load_recipe
from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.understanding.build import build_llava
from tokenflow_cli.understanding.config import LlavaModelConfig, LlavaRecipe, TinyLMConfig, stage_train_config
from tokenflow_cli.understanding.conversation import IGNORE_INDEX, ConversationFormatter
from tokenflow_cli.understanding.model import LlavaModel

N_VIS, C_VIS = 4, 6  # a fake feature source: 4 visual tokens of 6 channels per image

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "on the left"},
]
TEXTS = [
    "What colour is the circle? red blue green",
    "Where is it? on the left on the right",
    "How many squares are there? two three",
] * 4


def tiny_config(**changes) -> LlavaModelConfig:
    lm = TinyLMConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        vocab_size=300,
    )
    return dataclasses.replace(LlavaModelConfig(features="tokenflow", tiny_llm=lm, chat_template="plain"), **changes)


@pytest.fixture(scope="module")
def model() -> LlavaModel:
    torch.manual_seed(0)
    return build_llava(tiny_config(), C_VIS, N_VIS, TEXTS).eval()


def features(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, N_VIS, C_VIS, generator=torch.Generator().manual_seed(seed))


def test_visual_tokens_replace_the_placeholder_exactly(model: LlavaModel) -> None:
    fmt = model.formatter
    one = fmt.tokenize(CONV, num_image_tokens=1).input_ids
    tok = fmt.tokenize(CONV, num_image_tokens=N_VIS)
    p = one.index(model.image_token_id)
    assert one.count(model.image_token_id) == 1
    # the text around the placeholder is untouched; the run of N slots starts where <image> was
    assert tok.input_ids[:p] == one[:p] and tok.input_ids[p + N_VIS :] == one[p + 1 :]
    assert tok.input_ids[p : p + N_VIS] == [model.image_token_id] * N_VIS

    ids_BT = torch.tensor([tok.input_ids])
    vis_BNC = features(1)
    with torch.no_grad():
        emb_BTD = model.embed_inputs(ids_BT, vis_BNC)
        text_BTD = model.lm.get_input_embeddings()(ids_BT)
        proj_BND = model.projector(vis_BNC)
    torch.testing.assert_close(emb_BTD[0, p : p + N_VIS], proj_BND[0])
    keep = torch.ones(ids_BT.shape[1], dtype=torch.bool)
    keep[p : p + N_VIS] = False
    torch.testing.assert_close(emb_BTD[0, keep], text_BTD[0, keep])


def test_batch_images_fill_their_own_samples(model: LlavaModel) -> None:
    """Row-major filling: image k lands in sample k even when one sample has no image."""
    fmt = model.formatter
    a = fmt.tokenize(CONV, N_VIS).input_ids
    b = fmt.tokenize(CONV[2:], N_VIS, has_image=False).input_ids
    width = max(len(a), len(b))
    pad = model.text_tokenizer.pad_token_id
    ids_BT = torch.tensor([a + [pad] * (width - len(a)), b + [pad] * (width - len(b)), a + [pad] * (width - len(a))])
    vis_BNC = features(2, seed=1)
    with torch.no_grad():
        emb_BTD = model.embed_inputs(ids_BT, vis_BNC)
        proj_BND = model.projector(vis_BNC)
    p = a.index(model.image_token_id)
    torch.testing.assert_close(emb_BTD[0, p : p + N_VIS], proj_BND[0])
    torch.testing.assert_close(emb_BTD[2, p : p + N_VIS], proj_BND[1])
    with pytest.raises(ValueError, match="placeholder"):
        model.embed_inputs(ids_BT, features(1))


def test_labels_mask_everything_but_the_answers(model: LlavaModel) -> None:
    tok = model.formatter.tokenize(CONV, N_VIS)
    trained = [(i, t) for i, (t, lab) in enumerate(zip(tok.input_ids, tok.labels, strict=True)) if lab != IGNORE_INDEX]
    assert all(tok.labels[i] == t for i, t in trained)  # labels are the ids themselves (HF shifts)
    text = model.text_tokenizer.decode([t for _, t in trained])
    assert text == " red</s> on the left</s>"
    image_positions = [i for i, t in enumerate(tok.input_ids) if t == model.image_token_id]
    assert all(tok.labels[i] == IGNORE_INDEX for i in image_positions)
    # the prompt used at inference is exactly the training prefix before the first answer
    first = next(i for i, _ in trained)
    assert model.formatter.prompt(CONV[:1], N_VIS) == tok.input_ids[:first]


def test_chat_template_masks_are_exact() -> None:
    tok = train_bpe_tokenizer(TEXTS, 300, ["<image>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fmt = ConversationFormatter(tok, "auto", system_prompt="Answer briefly.")
    out = fmt.tokenize(CONV, 3)
    answers = tok.decode([t for t, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX])
    assert answers == "red<|im_end|>\non the left<|im_end|>\n"
    assert tok.decode(out.input_ids).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert out.input_ids.count(fmt.image_token_id) == 3
    assert tok.convert_tokens_to_ids("<|im_end|>") in fmt.stop_token_ids


def test_loss_only_counts_answers(model: LlavaModel) -> None:
    """Changing a prompt token's label target cannot change the loss; changing an answer can."""
    tok = model.formatter.tokenize(CONV, N_VIS)
    ids_BT, labels_BT = torch.tensor([tok.input_ids]), torch.tensor([tok.labels])
    with torch.no_grad():
        logits_BTV = model(ids_BT, visual_features=features(1)).logits
        loss = model(ids_BT, visual_features=features(1), labels=labels_BT).loss
    keep = labels_BT[0, 1:] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits_BTV[0, :-1][keep], labels_BT[0, 1:][keep])
    torch.testing.assert_close(loss, manual)


def test_cached_greedy_matches_full_recompute_and_padding(model: LlavaModel) -> None:
    vis_BNC = features(2, seed=3)
    questions = ["What colour is the circle?", "How many squares are there? Count them all."]
    batched = model.answer(vis_BNC, questions, max_new_tokens=6)
    singles = [model.answer(vis_BNC[i : i + 1], [q], max_new_tokens=6)[0] for i, q in enumerate(questions)]
    assert batched == singles  # left padding does not change an answer

    ids_BT, mask_BT = model.prompt_batch(questions[:1])
    steps = [int(t[0]) for t in model.generate_ids(ids_BT, mask_BT, vis_BNC[:1], max_new_tokens=6)]
    ids = ids_BT[0].tolist()
    for tid in steps:  # no cache: recompute the whole sequence each step
        with torch.no_grad():
            logits = model(torch.tensor([ids]), visual_features=vis_BNC[:1]).logits[0, -1]
        assert int(logits.argmax()) == tid
        ids.append(tid)


def test_stream_pieces_join_to_the_answer(model: LlavaModel) -> None:
    vis_1NC = features(1, seed=4)
    pieces = list(model.stream_answer(vis_1NC, "Where is it?", max_new_tokens=8))
    assert "".join(pieces) == model.answer(vis_1NC, ["Where is it?"], max_new_tokens=8)[0]


def test_saved_model_loads_and_answers_identically(model: LlavaModel, tmp_path) -> None:
    out = model.save_pretrained(tmp_path / "llava", extra={"tokenizer": "runs/tiny"})
    assert (out / "config.json").is_file() and (out / "projector.safetensors").is_file()
    loaded = LlavaModel.from_pretrained(out).eval()
    assert loaded.extra["tokenizer"] == "runs/tiny"
    vis_BNC = features(2, seed=5)
    qs = ["What colour is the circle?", "Where is it?"]
    assert loaded.answer(vis_BNC, qs, max_new_tokens=8) == model.answer(vis_BNC, qs, max_new_tokens=8)
    ids_BT, _ = loaded.prompt_batch(qs[:1])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids_BT, visual_features=vis_BNC[:1]).logits,
            model(ids_BT, visual_features=vis_BNC[:1]).logits,
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain_lm = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # the LLM alone
    assert sum(p.numel() for p in plain_lm.parameters()) == sum(p.numel() for p in model.lm.parameters())
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).convert_tokens_to_ids("<image>") == (
        model.image_token_id
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_parameter_selection(stage: int) -> None:
    torch.manual_seed(0)
    model = build_llava(tiny_config(), C_VIS, N_VIS, TEXTS)
    params = model.set_stage(stage)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    proj_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    tok = model.formatter.tokenize(CONV, N_VIS)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(torch.tensor([tok.input_ids]), visual_features=features(1), labels=torch.tensor([tok.labels])).loss
    loss.backward()
    opt.step()
    lm_changed = any(not torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())
    proj_changed = all(not torch.equal(v, model.projector.state_dict()[k]) for k, v in proj_before.items())
    assert proj_changed
    assert lm_changed == (stage == 2)
    assert {id(p) for p in params} >= {id(p) for p in model.projector.parameters()}


def test_init_from_saved_model_checks_feature_shape(model: LlavaModel, tmp_path) -> None:
    model.save_pretrained(tmp_path / "s1")
    again = build_llava(tiny_config(init=str(tmp_path / "s1")), C_VIS, N_VIS)
    torch.testing.assert_close(again.projector[0].weight, model.projector[0].weight)
    with pytest.raises(ValueError, match="visual"):
        build_llava(tiny_config(init=str(tmp_path / "s1")), C_VIS + 1, N_VIS)


def test_recipes_load() -> None:
    tiny = load_recipe("llava-tiny", LlavaRecipe)
    assert tiny.model.features == "tokenflow" and not tiny.model.llm
    s1 = stage_train_config(tiny, 1)
    assert s1.lr == tiny.stage1.lr and s1.steps == tiny.stage1.steps
    assert stage_train_config(tiny, 2) is tiny.train
    big = load_recipe("llava-siglip384-vicuna13b", LlavaRecipe, overrides=["model.features=pixel"])
    assert big.model.features == "pixel" and big.model.projector_hidden == 0


def test_bpe_round_trip() -> None:
    tok = train_bpe_tokenizer(TEXTS, 280, ["<image>"], add_bos=True)
    text = "Where is the <image> circle? é"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<image>") in ids
    assert tok.decode(ids[1:]) == text
