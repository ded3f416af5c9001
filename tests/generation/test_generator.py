"""Next-scale generator: block-causal mask, KV cache == full pass, sampler invariants.

Runs against a fake code embedder (random codebook, bicubic upsampling) so it does not need
the image tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.context import block_causal_allowed
from tokenflow_cli.generation.model import NextScaleGenerator, RefineBlock, TextBatch, build_generator
from tokenflow_cli.generation.sampling import SamplingPass, get_schedule


class FakeEmbedder:
    """Random l2-normalised codebook; VAR next-scale inputs with bicubic up / area down."""

    def __init__(self, scales: tuple[int, ...], codebook_size: int, code_dim: int, seed: int = 0) -> None:
        self.scales, self.codebook_size, self.code_dim = scales, codebook_size, code_dim
        g = torch.Generator().manual_seed(seed)
        self.codebook = F.normalize(torch.randn(codebook_size, code_dim, generator=g), dim=-1)

    def lookup_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        return self.codebook[idx_Bl]

    def next_scale_inputs(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        side, B = self.scales[-1], idx_BL.shape[0]
        f_hat, start, inputs = 0, 0, []
        for si, s in enumerate(self.scales[:-1]):
            code_map = self.lookup_codes(idx_BL[:, start : start + s * s]).transpose(1, 2).reshape(B, -1, s, s)
            start += s * s
            f_hat = f_hat + F.interpolate(code_map, size=(side, side), mode="bicubic")
            nxt = self.scales[si + 1]
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return inputs


CFG = GeneratorModelConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, text_vocab_size=40,
    max_text_tokens=6, scales=(1, 2, 3), codebook_size=48, code_dim=6, init_std=0.3,
)


def _model(attn: str = "sdpa", seed: int = 0) -> NextScaleGenerator:
    torch.manual_seed(seed)
    return build_generator(dataclasses.replace(CFG, attn_implementation=attn)).eval()


def _embedder() -> FakeEmbedder:
    return FakeEmbedder(CFG.scales, CFG.codebook_size, CFG.code_dim)


def _text(lengths: list[int], T: int = 6, seed: int = 0) -> TextBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CFG.text_vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n :] = 1
    return TextBatch(ids * mask, mask)


def _codes(batch: int, seed: int = 0) -> torch.Tensor:
    L = sum(s * s for s in CFG.scales)
    return torch.randint(0, CFG.codebook_size, (batch, L), generator=torch.Generator().manual_seed(seed))


def test_block_causal_mask_rules() -> None:
    # text(2) | scale0(1) | scale1(2) | refine of scale1(2)
    levels = torch.tensor([-1, -1, 0, 2, 2, 3, 3])
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    allowed = block_causal_allowed(levels, valid, 7)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],  # padding sees only itself
        [0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0],  # scale 1 sees all of scale 1
        [0, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 1],  # refine sees scale <= 1 and its own block
        [0, 1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(allowed, expected)
    assert torch.equal(block_causal_allowed(levels, valid, 2)[0, 0].int(), expected[-2:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_custom_mask_reaches_the_llama_attention(attn: str) -> None:
    """Changing a later scale leaves earlier logits alone; changing a token of the same scale
    moves every logit of that scale (within-scale attention is bidirectional)."""
    model, emb = _model(attn), _embedder()
    text, codes = _text([3, 6]), _codes(2)
    inputs = emb.next_scale_inputs(codes)
    base = model(text, inputs).logits_BLK
    later = [inputs[0], inputs[1] + 1.0]  # scale 2's inputs
    changed = model(text, later).logits_BLK
    torch.testing.assert_close(changed[:, :5], base[:, :5], rtol=0, atol=1e-5)
    assert (changed[:, 5:] - base[:, 5:]).abs().amax() > 1e-3
    same_scale = [inputs[0].clone(), inputs[1]]
    same_scale[0][:, -1] += 1.0  # last token of scale 1 changes -> first token of scale 1 too
    moved = model(text, same_scale).logits_BLK
    assert (moved[:, 1] - base[:, 1]).abs().amax() > 1e-3
    torch.testing.assert_close(moved[:, 0], base[:, 0], rtol=0, atol=1e-5)


def test_sdpa_and_eager_agree() -> None:
    emb, text, codes = _embedder(), _text([2, 5]), _codes(2)
    a = _model("sdpa")(text, emb.next_scale_inputs(codes)).logits_BLK
    b = _model("eager")(text, emb.next_scale_inputs(codes)).logits_BLK
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_logits() -> None:
    model, emb, codes = _model(), _embedder(), _codes(1)
    text = _text([3])
    a = model(text, emb.next_scale_inputs(codes)).logits_BLK
    b = model(text.pad_left(9), emb.next_scale_inputs(codes)).logits_BLK
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_stepwise_logits_equal_full_pass(use_cache: bool) -> None:
    model, emb = _model(), _embedder()
    text, codes = _text([2, 6, 4]), _codes(3, seed=5)
    inputs = emb.next_scale_inputs(codes)
    with torch.no_grad():
        full = model(text, inputs).logits_BLK
    step = model.stepwise_logits(text, inputs, use_cache=use_cache)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_refine_block_cached_equals_full_pass() -> None:
    model, emb = _model(), _embedder()
    torch.nn.init.normal_(model.draft_projector[-1].weight, std=0.3)  # make the draft matter
    text, codes, drafts = _text([4, 6]), _codes(2), _codes(2, seed=9)
    inputs = emb.next_scale_inputs(codes)
    for si in range(len(CFG.scales)):
        draft = emb.lookup_codes(drafts[:, model.scale_slice(si)])
        with torch.no_grad():
            full = model(text, inputs, RefineBlock(si, draft))
            ctx = model._start(text, use_cache=True)
            for sj in range(si + 1):
                embeds = model.embed_scale(sj, inputs[sj - 1] if sj else None, 2)
                logits = model._step(ctx, embeds, sj, text.ids_BT.shape[1])
            cached = model._step(ctx, model.embed_refine(si, embeds, draft), si, text.ids_BT.shape[1], model.multi_step)
            ctx.rollback(embeds.shape[1])
            assert ctx.cache.get_seq_length() == text.ids_BT.shape[1] + model.offsets[si + 1]
        torch.testing.assert_close(cached, full.refine_logits_BlK, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, full.logits_BLK[:, model.scale_slice(si)], rtol=1e-5, atol=1e-5)
        # the refine block is invisible to the normal positions
        torch.testing.assert_close(full.logits_BLK, model(text, inputs).logits_BLK, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["one-pass", "three-pass"])
def test_cached_and_recomputed_sampling_give_the_same_codes(schedule: str) -> None:
    model, emb = _model(), _embedder()
    torch.nn.init.normal_(model.draft_projector[-1].weight, std=0.3)
    text, negative = _text([3, 6, 2]), _text([1, 1, 1], seed=3)
    runs = [
        model.generate(emb, text, negative, get_schedule(schedule), cfg=2.0, temperature=1.3,
                       generator=torch.Generator().manual_seed(7), use_cache=use_cache)
        for use_cache in (True, False, True)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = model.generate(emb, text, negative, get_schedule(schedule), cfg=2.0, temperature=1.3,
                           generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def _guided_logits(model: NextScaleGenerator, emb: FakeEmbedder, text: TextBatch, negative: TextBatch | None,
                   codes: torch.Tensor, cfg: float) -> torch.Tensor:
    inputs = emb.next_scale_inputs(codes)
    with torch.no_grad():
        cond = model(text, inputs).logits_BLK
        if negative is None:
            return cond
        uncond = model(negative, inputs).logits_BLK
    n = len(CFG.scales)
    t = torch.cat([torch.full((s * s,), cfg * si / (n - 1)) for si, s in enumerate(CFG.scales)])[None, :, None]
    return (1 + t) * cond - t * uncond


@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_one_pass_k1_is_greedy(cfg: float) -> None:
    model, emb = _model(), _embedder()
    text, negative = _text([3, 5]), _text([1, 1], seed=4)
    codes = model.generate(emb, text, negative, (SamplingPass(1, 0.0),), cfg=cfg)
    guided = _guided_logits(model, emb, text, negative, codes, cfg)
    assert torch.equal(codes, guided.argmax(-1))


def test_cfg_zero_equals_the_conditional_model() -> None:
    model, emb = _model(), _embedder()
    text, negative = _text([3, 5]), _text([2, 1], seed=4)
    schedule = get_schedule("two-pass")
    doubled = model.generate(emb, text, negative, schedule, cfg=0.0, generator=torch.Generator().manual_seed(1))
    cond = model.generate(emb, text, None, schedule, cfg=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(doubled, cond)
    guided = model.generate(emb, text, negative, schedule, cfg=5.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(guided, cond)
    with pytest.raises(ValueError):
        model.generate(emb, text, None, schedule, cfg=1.0)


def _certain_model() -> NextScaleGenerator:
    """Attention and MLP outputs zeroed: each image position's logits depend only on its own
    input embedding, and a large position table and head make them peaked."""
    model = _model(seed=3)
    with torch.no_grad():
        for layer in model.lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.pos_embed.mul_(100.0)
        model.head.weight.mul_(300.0)
        torch.nn.init.normal_(model.draft_projector[-1].weight, std=0.01)  # the draft does reach it
    return model


def test_second_greedy_pass_changes_nothing_when_the_model_is_certain() -> None:
    model, emb = _certain_model(), _embedder()
    text, negative = _text([3, 5]), _text([1, 1], seed=4)
    codes = _codes(2)
    probs = torch.softmax(_guided_logits(model, emb, text, None, codes, 0.0), -1)
    assert probs.amax(-1).min() > 0.99  # precondition: the model is certain everywhere
    one = (SamplingPass(1200, 0.8),)
    two = (SamplingPass(1200, 0.8), SamplingPass(1, 0.0))
    for use_cache in (True, False):
        a = model.generate(emb, text, negative, one, cfg=0.0, generator=torch.Generator().manual_seed(2),
                           use_cache=use_cache)
        b = model.generate(emb, text, negative, two, cfg=0.0, generator=torch.Generator().manual_seed(2),
                           use_cache=use_cache)
        assert torch.equal(a, b)


def test_second_pass_replaces_the_draft() -> None:
    """On an uncertain model the greedy second pass is the argmax of the refine logits given
    the first draft, not the draft itself."""
    model, emb = _model(), _embedder()
    torch.nn.init.normal_(model.draft_projector[-1].weight, std=1.0)
    text = _text([4])
    first = (SamplingPass(0, 0.0),)
    two = (SamplingPass(0, 0.0), SamplingPass(1, 0.0))
    drafts = model.generate(emb, text, None, first, generator=torch.Generator().manual_seed(0))
    final = model.generate(emb, text, None, two, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(drafts, final)
    # scale 0: the refine block re-predicts from the scale-0 draft
    with torch.no_grad():
        out = model(text, emb.next_scale_inputs(final), RefineBlock(0, emb.lookup_codes(drafts[:, :1])))
    assert torch.equal(final[:, :1], out.refine_logits_BlK.argmax(-1))


def test_training_forward_backward_reaches_every_parameter() -> None:
    model, emb = _model(), _embedder()
    model.train()
    text, codes = _text([3, 6]), _codes(2)
    out = model(text, emb.next_scale_inputs(codes), RefineBlock(1, emb.lookup_codes(codes[:, 1:5])))
    loss = F.cross_entropy(out.logits_BLK.flatten(0, 1), codes.flatten())
    loss = loss + F.cross_entropy(out.refine_logits_BlK.flatten(0, 1), codes[:, 1:5].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # the zero-initialised last layer of the draft projector gives its input layer no gradient yet
    assert missing == ["draft_projector.0.weight", "draft_projector.0.bias"], missing


def test_recipes_load_and_match_the_tiny_tokenizer() -> None:
    from tokenflow_cli.config import ConfigError, load_recipe
    from tokenflow_cli.generation.config import GeneratorRecipe, attach_code_space
    from tokenflow_cli.tokenizer.config import TokenizerRecipe

    tiny = load_recipe("generator-tiny", GeneratorRecipe)
    tok = load_recipe("tiny", TokenizerRecipe).model.quantizer
    assert (tiny.model.scales, tiny.model.codebook_size, tiny.model.code_dim) == ((), 0, 0)  # not repeated
    tiny_model = attach_code_space(tiny.model, tok.scales, tok.codebook_size, tok.semantic_dim + tok.pixel_dim)
    assert tiny_model.scales == tok.scales and tiny_model.codebook_size == tok.codebook_size
    assert tiny_model.code_dim == tok.semantic_dim + tok.pixel_dim
    with pytest.raises(ConfigError, match="model.codebook_size=512"):  # a pinned value must agree
        attach_code_space(dataclasses.replace(tiny.model, codebook_size=512), tok.scales, tok.codebook_size, 40)
    with pytest.raises(ValueError, match="code space"):
        build_generator(tiny.model)
    big = load_recipe("generator-llama7b", GeneratorRecipe)
    assert big.model.lm_path and big.data.tokenizer
    model = build_generator(tiny_model)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    with pytest.raises(ValueError):
        build_generator(dataclasses.replace(CFG, attn_implementation="flash_attention_2"))
    with pytest.raises(FileNotFoundError):
        build_generator(dataclasses.replace(CFG, lm_path="/nonexistent/llama"))
