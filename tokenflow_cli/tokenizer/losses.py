"""Tokenizer losses: hinge GAN with a start step and VQGAN's adaptive
weight, and the semantic cosine loss against the frozen teacher. LPIPS is built by
`eval.image_metrics.build_lpips` (the same module the evaluation reports).

L2, VQ and commitment come straight from `TokenizerOutput`; the weighting lives in
`tokenizer/stage.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow_cli.tokenizer.config import LossConfig

# --------------------------------------------------------------------------------------------
# GAN
# --------------------------------------------------------------------------------------------


def gan_active(step: int, cfg: LossConfig) -> bool:
    """The discriminator and the generator's GAN term run from `gan_start_step` on."""
    return cfg.gan_weight > 0 and step >= cfg.gan_start_step


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters without gradients for the duration: the generator's GAN term flows back into
    the image but never into the discriminator (whose own loss trains it)."""
    previous = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), previous):
            p.requires_grad_(flag)


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN (Esser et al. 2021, eq. 7): lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4) at the
    decoder's last layer L, so the GAN term neither dwarfs nor vanishes against reconstruction."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------
# Semantic
# --------------------------------------------------------------------------------------------


def semantic_cosine_loss(pred_BNT: torch.Tensor, target_BNT: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, teacher) (BEiT-v2 / official TokenFlow)."""
    if pred_BNT.shape != target_BNT.shape:
        raise ValueError(
            f"semantic prediction {tuple(pred_BNT.shape)} and teacher tokens {tuple(target_BNT.shape)} "
            "differ: the teacher grid must match the last scale and model.teacher.dim the teacher width"
        )
    return (1.0 - F.cosine_similarity(pred_BNT.float(), target_BNT.float(), dim=-1)).mean()
