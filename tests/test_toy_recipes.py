"""bf16 autocast on CPU and the toy recipes learning runs on 2 CPU cores use (issue 12)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tokenflow_cli.config import load_recipe
from tokenflow_cli.device import autocast
from tokenflow_cli.generation.config import GeneratorRecipe, attach_code_space
from tokenflow_cli.generation.model import TextBatch, build_generator
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.model import build_tokenizer
from tokenflow_cli.tokenizer.scales import ScaleLayout

CPU = torch.device("cpu")


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                  ("fp16", torch.float32)])
def test_cpu_autocast_runs_matmuls_in_bf16_only(precision, dtype):
    a = torch.randn(4, 8)
    with autocast(precision, CPU):
        assert (a @ a.T).dtype == dtype  # fp16 stays a no-op on CPU (no gradient scaler there)


def test_toy_tokenizer_budget_and_a_bf16_step_with_fp32_codebook_search():
    recipe = load_recipe("shapes-toy", TokenizerRecipe)
    q = recipe.model.quantizer
    assert recipe.model.image_size == recipe.data.image_size == 32
    assert ScaleLayout(q.scales).num_tokens == 130 and q.codebook_size == 512
    torch.manual_seed(0)
    tok = build_tokenizer(recipe.model).train()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    with autocast("bf16", CPU):
        out = tok(img, decode_semantic=True)
        loss = F.mse_loss(out.reconstruction.float(), img) + out.codebook_loss + out.commit_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert out.codes.indices.shape == (2, 130) and int(out.codes.indices.max()) < 512
    assert all(p.dtype == torch.float32 for p in tok.parameters())  # autocast casts, weights stay fp32
    assert tok.quantizer(tok.encode_features(img)).indices[0].dtype == torch.int64


def test_toy_generator_takes_the_toy_code_space_and_trains_under_bf16():
    tok = build_tokenizer(load_recipe("shapes-toy", TokenizerRecipe).model).eval()
    recipe = load_recipe("generator-toy", GeneratorRecipe)
    cfg = attach_code_space(recipe.model, tok.scales, tok.codebook_size, tok.code_dim)
    cfg = dataclasses.replace(cfg, text_vocab_size=64)
    torch.manual_seed(0)
    model = build_generator(cfg).train()
    idx_BL = torch.randint(512, (2, 130))
    text = TextBatch(torch.randint(64, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    with autocast("bf16", CPU):
        out = model(text, model.scale_inputs(tok, idx_BL), None)
        loss = F.cross_entropy(out.logits_BLK.flatten(0, 1).float(), idx_BL.flatten())
    loss.backward()
    assert out.logits_BLK.shape == (2, 130, 512)
    assert torch.isfinite(loss) and abs(loss.detach().item() - math.log(512)) < 1.0  # near chance at init
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()
