"""Semantic decoder: a BEiT-v2 style ViT from quantized semantic codes to the teacher's space.

Layout follows the official `decoder_vqkd` so released checkpoints convert by renaming only:
`cls_token` (1, 1, D), `pos_embed` (1, g*g + 1, D), `patch_embed.proj` (a 1x1 conv, in -> D),
`blocks.N.{norm1, attn.qkv (bias-free), attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1,
mlp.fc2}` and `fc_norm`. Also home of the DINO-style position-grid resize that the semantic
towers share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow_cli.tokenizer.config import SemanticDecoderConfig


def resize_patch_positions(pos_ND: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A square (g0*g0, D) patch position table -> (h*w, D); unchanged when (h, w) == (g0, g0).

    DINO/BEiT-v2 style, as the official model does: bicubic with scale factors (h + 0.1) / g0
    and (w + 0.1) / g0 (the 0.1 keeps floor(g0 * scale) == h under float rounding, and the
    scale factor, not the output size, sets the sampling grid).
    """
    n, dim = pos_ND.shape
    g0 = math.isqrt(n)
    if g0 * g0 != n:
        raise ValueError(f"position table of {n} rows is not a square grid")
    if (h, w) == (g0, g0):
        return pos_ND
    grid_1Dgg = pos_ND.float().reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
    grid_1Dhw = F.interpolate(
        grid_1Dgg, scale_factor=((h + 0.1) / g0, (w + 0.1) / g0), mode="bicubic", align_corners=False
    )
    if grid_1Dhw.shape[-2:] != (h, w):
        raise RuntimeError(f"position resize gave {tuple(grid_1Dhw.shape[-2:])}, wanted {(h, w)}")
    return grid_1Dhw.permute(0, 2, 3, 1).reshape(h * w, dim).to(pos_ND.dtype)


def task_layer(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> Tanh -> Linear: the official encode/decode projection heads."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


class BeitAttention(nn.Module):
    """Multi-head self-attention with a fused bias-free qkv weight plus q and v biases.

    BEiT keeps the key bias at zero (it cancels in the softmax anyway), so only q_bias and
    v_bias are parameters.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x_BLD, self.qkv.weight, bias).reshape(B, L, 3, self.heads, D // self.heads)
        q_BHLd, k_BHLd, v_BHLd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd)
        return self.proj(out_BHLd.transpose(1, 2).reshape(B, L, D))


class BeitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as BEiT-v2
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BeitBlock(nn.Module):
    """Pre-norm transformer block without layer scale."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BeitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = BeitMlp(dim, int(dim * mlp_ratio))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD))
        return x_BLD + self.mlp(self.norm2(x_BLD))


class PatchEmbed1x1(nn.Module):
    """Holds the 1x1 "patch" conv under the name `proj` (official key `patch_embed.proj`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=1)

    def forward(self, f_BChw: torch.Tensor) -> torch.Tensor:
        return self.proj(f_BChw).flatten(2).transpose(1, 2)  # (B, h*w, D)


class SemanticDecoder(nn.Module):
    """(B, in_dim, h, w) quantized semantic codes -> (B, h*w, D) patch tokens after `fc_norm`."""

    def __init__(self, cfg: SemanticDecoderConfig, in_dim: int):
        super().__init__()
        self.config = cfg
        self.width = cfg.width
        g, dim = cfg.grid_size, cfg.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + 1, dim))
        self.patch_embed = PatchEmbed1x1(in_dim, dim)
        self.blocks = nn.ModuleList(BeitBlock(dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # BEiT-v2 init: truncated normal (std 0.02) for tokens, positions and linear weights.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, f_BChw: torch.Tensor) -> torch.Tensor:
        B, _, h, w = f_BChw.shape
        x_BND = self.patch_embed(f_BChw)
        pos_patch = resize_patch_positions(self.pos_embed[0, 1:], h, w)
        pos_1LD = torch.cat([self.pos_embed[0, :1], pos_patch]).unsqueeze(0)
        x_BLD = torch.cat([self.cls_token.expand(B, -1, -1), x_BND], dim=1) + pos_1LD.to(x_BND.dtype)
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self.fc_norm(x_BLD[:, 1:])  # class token dropped before the final norm
