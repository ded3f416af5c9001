"""The generator's architecture switches (lm_arch, next_scale_input, multi_step, text_layout,
image_head) in every combination that matters: the KV-cached sampler gives the recompute-all
sampler's codes, teacher forcing computed scale by scale equals the one-pass forward, sdpa equals
eager, every parameter trains (with and without activation checkpointing), and the official text
layout builds fixed-length prompts with the `<img>` marker."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_generator import CFG, FakeEmbedder

from tokenflow_cli.data.text_tokenizer import train_bpe_tokenizer
from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.model import NextScaleGenerator, RefineBlock, TextBatch, build_generator
from tokenflow_cli.generation.next_scale import Replayed, running_map, teacher_inputs
from tokenflow_cli.generation.prompts import PromptEncoder
from tokenflow_cli.generation.sampling import get_schedule

OFFICIAL = dict(lm_arch="llama-qknorm-postnorm", next_scale_input="chained", multi_step="inplace",
                text_layout="official", image_head="shared-vocabulary")
LAYOUTS = {
    "ours": {},
    "official": OFFICIAL,
    "var-inplace": dict(multi_step="inplace"),
    "chained-refine": dict(next_scale_input="chained"),
    "official-block-only": dict(lm_arch="llama-qknorm-postnorm"),
}


def _model(layout: str, seed: int = 0, **extra) -> NextScaleGenerator:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(CFG, scales=(1, 2, 3, 4), **LAYOUTS[layout], **extra)
    model = build_generator(cfg).eval()
    if model.draft_projector is not None:
        torch.nn.init.normal_(model.draft_projector[-1].weight, std=0.3)  # make the draft matter
    return model


def _embedder() -> FakeEmbedder:
    return FakeEmbedder((1, 2, 3, 4), CFG.codebook_size, CFG.code_dim)


def _text(lengths: list[int], seed: int = 0) -> TextBatch:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, CFG.text_vocab_size, (len(lengths), T), generator=g)
    mask = torch.stack([torch.arange(T) >= T - n for n in lengths]).long()
    return TextBatch(ids * mask, mask)


def _codes(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.codebook_size, (batch, 30), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("keep_ties", [False, True])
def test_cached_sampler_gives_the_recompute_all_codes(layout: str, keep_ties: bool) -> None:
    model, emb = _model(layout), _embedder()
    text, negative = _text([3, 6, 2]), _text([1, 1, 1], seed=3)
    runs = [model.generate(emb, text, negative, get_schedule("three-pass"), cfg=2.0, temperature=1.3,
                           generator=torch.Generator().manual_seed(7), use_cache=use_cache, keep_ties=keep_ties)
            for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stepwise_logits_equal_the_full_pass_and_eager(layout: str) -> None:
    emb, text, codes = _embedder(), _text([2, 6, 4]), _codes(3, seed=5)
    model = _model(layout)
    inputs = model.scale_inputs(emb, codes)
    with torch.no_grad():
        full = model(text, inputs).logits_BLK
        eager = _model(layout, attn_implementation="eager")(text, inputs).logits_BLK
    torch.testing.assert_close(model.stepwise_logits(text, inputs, use_cache=True), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["var", "chained"])
def test_incremental_inputs_equal_a_rebuild_and_var_equals_the_embedder(rule: str) -> None:
    emb, codes = _embedder(), _codes(2, seed=4)
    fresh, replayed, start = running_map(rule, emb), Replayed(rule, emb), 0
    for si, s in enumerate(emb.scales):
        part = codes[:, start : start + s * s]
        torch.testing.assert_close(fresh.with_draft(part, si), replayed.with_draft(part, si), rtol=0, atol=0)
        a, b = fresh.commit(part, si), replayed.commit(part, si)
        assert (a is None) == (b is None) == (si + 1 == len(emb.scales))
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        start += s * s
    if rule == "var":
        for ours, theirs in zip(teacher_inputs("var", emb, codes), emb.next_scale_inputs(codes), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_official_layout_trains_every_parameter(checkpointing: bool) -> None:
    emb, text, codes = _embedder(), _text([3, 6]), _codes(2)
    grads = []
    for on in (False, checkpointing):
        model = _model("official", gradient_checkpointing=on).train()
        loss = F.cross_entropy(model(text, model.scale_inputs(emb, codes)).logits_BLK.flatten(0, 1), codes.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert model.draft_projector is None and model.head.bias is None
    missing = [n for n, g in grads[1].items() if g is None or not g.abs().sum() > 0]
    assert missing == [], missing
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    qk = [m for n, m in model.lm.named_modules() if n.endswith("self_attn.q_norm")]
    assert qk and all(m.variance_epsilon == 1e-6 for m in qk) and qk[0].weight.shape == (CFG.hidden_size // 4,)


def test_inplace_has_no_refine_block_in_training() -> None:
    model, emb = _model("official"), _embedder()
    with pytest.raises(ValueError, match="no trained refine block"):
        model(_text([2]), model.scale_inputs(emb, _codes(1)), RefineBlock(1, torch.zeros(1, 4, CFG.code_dim)))


def test_official_text_layout_is_fixed_length_with_the_marker() -> None:
    tok = train_bpe_tokenizer(["a photo of a red circle", "<img>"], vocab_size=300)
    marker = tuple(tok("<img>", add_special_tokens=False)["input_ids"])
    enc = PromptEncoder(tok, max_tokens=8, layout="official", marker_ids=marker)
    batch = enc(["a photo of a red circle", "a photo of a red circle " * 5, ""])
    assert batch.ids_BT.shape == (3, 8 + len(marker) - 1)
    for row in range(3):  # every row ends with the marker but its last id (scale 0's position)
        assert batch.ids_BT[row, 8:].tolist() == list(marker[:-1])
    assert batch.ids_BT[2, 7] == tok.bos_token_id and batch.mask_BT[2, :7].sum() == 0
    assert batch.ids_BT[1, 0] == tok.bos_token_id and batch.mask_BT[1].all()  # truncated, the start kept
    padded = PromptEncoder(tok, max_tokens=8)(["a", ""])
    assert padded.ids_BT.shape[1] < 8  # ours pads to the batch's longest


def test_unknown_switch_values_name_the_choices() -> None:
    for key, value in [("multi_step", "x"), ("next_scale_input", "x"), ("text_layout", "x"), ("image_head", "x"),
                       ("lm_arch", "x")]:
        with pytest.raises(ValueError, match=key):
            build_generator(dataclasses.replace(CFG, **{key: value}))
    assert GeneratorModelConfig().multi_step == "refine"
