"""VQGAN-style pixel encoder and decoder, in the official TokenFlow layout.

Module and parameter names reproduce the official state dict under `encoder.` / `decoder.`
(the official checkpoints' key layout), so a converter maps `encoder.X -> pixel_encoder.X` with the
same suffix X. The 1x1 `quant_conv` / `post_quant_conv` belong to the tokenizer, not here.

Encoder:  conv_in -> conv_blocks[0..L-1] (res x R, attn x R at the deepest level, stride-2
          downsample on all but the deepest) -> mid (res, attn, res) -> norm_out, swish, conv_out.
Decoder:  conv_in -> mid -> conv_blocks[0..L-1] deepest level first (res x R, attn x R only in
          conv_blocks.0, nearest 2x upsample + conv on all but the last) -> norm_out, swish,
          conv_out to RGB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenflow_cli.tokenizer.config import PixelConfig


def downsample_factor(cfg: PixelConfig) -> int:
    """Spatial reduction of the encoder: one 2x step between consecutive levels."""
    return 2 ** (len(cfg.channel_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # eps 1e-6 as in VQGAN / the official checkpoints (PyTorch's default is 1e-5).
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm, swish, conv3x3, norm, swish, dropout, conv3x3; 1x1 `nin_shortcut` if width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, q/k/v/proj_out as 1x1 convs.

    softmax(q k^T / sqrt(C)) v: `scaled_dot_product_attention`'s default scale is 1/sqrt of the
    last dimension, which is the width C here, so the math equals the official bmm version.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        n = self.norm(x_BChw)
        # (B, C, h, w) -> (B, 1, h*w, C): one head, positions as the sequence.
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(n), self.k(n), self.v(n)))
        a_B1NC = F.scaled_dot_product_attention(q, k, v)
        a_BChw = a_B1NC.squeeze(1).transpose(1, 2).reshape(B, C, h, w)
        return x_BChw + self.proj_out(a_BChw)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (VQGAN's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `res.M`, optional `attn.M` (one after each res block), then an
    optional `downsample` or `upsample` (named as in the official state dict)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res: int,
        attn: bool,
        resample: str | None,
        groups: int,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res
        self.res = nn.ModuleList(ResBlock(widths[i], widths[i + 1], groups, dropout) for i in range(num_res))
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(num_res)) if attn else None
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def blocks(self) -> list[nn.Module]:
        """Res and attention blocks in execution order (res0, attn0, res1, attn1, ...)."""
        out: list[nn.Module] = []
        for i, res in enumerate(self.res):
            out.append(res)
            if self.attn is not None:
                out.append(self.attn[i])
        return out


def _run(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    # Activation checkpointing trades one extra forward per block for activation memory.
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def _mid(channels: int, groups: int, dropout: float) -> nn.Sequential:
    """res, attn, res at the deepest width: keys `mid.0`, `mid.1`, `mid.2`."""
    return nn.Sequential(
        ResBlock(channels, channels, groups, dropout),
        AttnBlock(channels, groups),
        ResBlock(channels, channels, groups, dropout),
    )


class PixelEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = downsample_factor(cfg)."""

    def __init__(self, cfg: PixelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(
                in_channels=cfg.base_channels if i == 0 else widths[i - 1],
                out_channels=widths[i],
                num_res=cfg.encoder_res_blocks,
                attn=cfg.attn_at_lowest and i == last,
                resample="down" if i != last else None,
                groups=cfg.norm_groups,
                dropout=cfg.dropout,
            )
            for i in range(len(widths))
        )
        self.mid = _mid(widths[-1], cfg.norm_groups, cfg.dropout)
        self.norm_out = _norm(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(img_BCHW)
        for level in self.conv_blocks:
            for block in level.blocks():
                h = _run(block, h, ckpt)
            if level.resample == "down":
                h = level.downsample(h)
        for block in self.mid:
            h = _run(block, h, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class PixelDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f) RGB in about [-1, 1]."""

    def __init__(self, cfg: PixelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        # Decoder levels run deepest first, with their own base width (256 when "enhanced").
        widths = [cfg.decoder_base_channels * m for m in reversed(cfg.channel_mult)]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], cfg.norm_groups, cfg.dropout)
        self.conv_blocks = nn.ModuleList(
            Level(
                in_channels=widths[0] if i == 0 else widths[i - 1],
                out_channels=widths[i],
                num_res=cfg.decoder_res_blocks,
                attn=cfg.attn_at_lowest and i == 0,
                resample="up" if i != last else None,
                groups=cfg.norm_groups,
                dropout=cfg.dropout,
            )
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the final conv (VQGAN's adaptive GAN weight uses its gradients)."""
        return self.conv_out.weight

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(z_BChw)
        for block in self.mid:
            h = _run(block, h, ckpt)
        for level in self.conv_blocks:
            for block in level.blocks():
                h = _run(block, h, ckpt)
            if level.resample == "up":
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)
