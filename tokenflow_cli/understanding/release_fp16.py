"""The released TokenFlow-LLaVA as its own loader runs it: everything in float16 (`--dtype fp16`).

The official loader (`load_pretrained_model`, `i2t/llava/model/builder.py:43`) loads the model
with `torch_dtype=torch.float16`, the embedded tokenizer copy included, and casts the tower to
float16 again at its end; the evaluation casts the images to float16 too. So the release's
features come from the tokenizer's encode run entirely in fp16, code search included:

- SigLIP `scaling_layer`: `((x + 1) * 127.5).clamp(0, 255) / 255`, then `(x - 0.5) / 0.5` with
  fp16 buffers; the tower's tokens (transformers' SigLIP, scaled-dot-product attention, as the
  official one runs), `encode_task_layer`;
- pixel branch: bicubic to 432, the VQGAN encoder with swish as `x * sigmoid(x)` and attention
  as two `bmm` with an explicit softmax (both round differently from `F.silu` / SDPA in fp16);
- per scale: area down, both halves and both codebooks l2-normalised, the full distance
  `||z||^2 + ||e||^2 - 2 z.e` per half summed, `argmin` (first index on ties), the
  straight-through value `z + (e - z)` (not exactly `e` in fp16), bicubic up, running sum;
- the features are that running sum (`final_quantize`), not a re-lookup of the indices.

Then the projector and the LM in fp16 (`LlavaModel` with the fp16 dtype; transformers upcasts
the logits). Our default path instead runs the tokenizer in fp32 over the stored bf16 weights,
which reproduces the official code's fp32 computation; docs/CONVERT.md gives both measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow_cli.tokenizer.pixel import AttnBlock, PixelEncoder, ResBlock

RELEASE_DTYPE = torch.float16


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # official `nonlinearity`


def _res_block(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    h = block.conv1(_swish(block.norm1(x)))
    h = block.conv2(_swish(block.norm2(h)))
    return block.nin_shortcut(x) + h


def _attn_block(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    n = block.norm(x)
    q, k, v = block.q(n), block.k(n), block.v(n)
    b, c, h, w = q.shape
    weights = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    weights = F.softmax(weights, dim=2)
    out = torch.bmm(v.reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(out)


def _block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _attn_block(block, x) if isinstance(block, AttnBlock) else _res_block(block, x)


def pixel_encoder(enc: PixelEncoder, x: torch.Tensor) -> torch.Tensor:
    """`PixelEncoder.forward` with the official op formulations."""
    h = enc.conv_in(x)
    for level in enc.conv_blocks:
        for block in level.blocks():
            h = _block(block, h)
        if level.resample == "down":
            h = level.downsample(h)
    for block in enc.mid:
        h = _block(block, h)
    return enc.conv_out(_swish(enc.norm_out(h)))


def _scaling(img: torch.Tensor, input_norm: str) -> torch.Tensor:
    if input_norm == "none":  # CLIP teachers take the [-1, 1] image as it is
        return img
    half = torch.full((1, 3, 1, 1), 0.5, dtype=img.dtype, device=img.device)
    return (((img + 1.0) * 127.5).clamp(0, 255.0) / 255.0 - half) / half  # ScalingLayerForSigLip


def encode_features(tok: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """The continuous map before quantization, (B, d_sem + d_pix, h, w), in the tokenizer's dtype."""
    sem_enc = tok.semantic_encoder
    tokens = sem_enc.backend.tokens(sem_enc.tower, _scaling(img, sem_enc.config.input_norm),
                                    sem_enc.config.feature_layer)
    f_sem = tok.semantic_proj(tokens)  # (B, N, d_sem)
    side = int(round(f_sem.shape[1] ** 0.5))
    f_sem = f_sem.transpose(1, 2).reshape(f_sem.shape[0], -1, side, side)
    pix_in = img
    if tok.pixel_size != img.shape[-1]:
        pix_in = F.interpolate(img, size=(tok.pixel_size, tok.pixel_size), mode="bicubic")
    f_pix = tok.quant_conv(pixel_encoder(tok.pixel_encoder, pix_in))
    return torch.cat([f_sem, f_pix], dim=1)


def quantize(quantizer: nn.Module, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official residual loop in `f`'s dtype -> (final_quantize (B, C, h, w), indices (B, L))."""
    cfg = quantizer.cfg
    split = [cfg.semantic_dim, cfg.pixel_dim]
    side = f.shape[-1]
    e_sem = F.normalize(quantizer.semantic_codebook.weight.to(f.dtype), p=2, dim=-1)
    e_pix = F.normalize(quantizer.pixel_codebook.weight.to(f.dtype), p=2, dim=-1)
    e_all = torch.cat([e_sem, e_pix], dim=-1)
    residual, final, indices = f, torch.zeros_like(f), []
    for s in quantizer.scales:
        z = F.interpolate(residual, size=(s, s), mode=cfg.downsample_mode).permute(0, 2, 3, 1).contiguous()
        z_sem, z_pix = (F.normalize(t, p=2, dim=-1) for t in torch.split(z.view(-1, z.shape[-1]), split, dim=-1))
        d = (z_sem.pow(2).sum(1, keepdim=True) + e_sem.pow(2).sum(1) - 2 * (z_sem @ e_sem.T)) + 1.0 * (
            z_pix.pow(2).sum(1, keepdim=True) + e_pix.pow(2).sum(1) - 2 * (z_pix @ e_pix.T))
        idx = torch.argmin(d, dim=1)
        z_n = torch.cat([F.normalize(t, p=2, dim=-1) for t in torch.split(z, split, dim=-1)], dim=-1)
        z_q = z_n + (e_all[idx].view(z_n.shape) - z_n)  # the straight-through value, rounded in fp16
        up = F.interpolate(z_q.permute(0, 3, 1, 2), size=(side, side), mode=cfg.upsample_mode)
        final = final + up
        residual = residual - up
        indices.append(idx.view(f.shape[0], s * s))
    return final, torch.cat(indices, dim=1)


class ReleaseFp16Features(nn.Module):
    """Feature source of `--dtype fp16`: [-1, 1] images -> (B, N, C) float16 features as the
    official loader computes them, from the tokenizer cast to float16 (`tok` is cast in place)."""

    def __init__(self, tok: nn.Module, grid: int = 0) -> None:
        super().__init__()
        if grid and grid != tok.grid:
            raise ValueError("--dtype fp16 runs the official final_quantize, which has no feature_grid")
        self.tokenizer = tok.to(RELEASE_DTYPE).eval().requires_grad_(False)
        self.image_size: int = tok.image_size
        self.kind = "tokenflow"
        self.grid = grid
        self.teacher = None  # TokenizerFeatures' interface: no teacher module
        self.num_tokens: int = tok.grid * tok.grid
        self.feature_dim: int = tok.code_dim

    def train(self, mode: bool = True) -> ReleaseFp16Features:
        return super().train(False)

    @torch.no_grad()
    def encode(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features (B, N, C) float16, indices (B, L))."""
        f = encode_features(self.tokenizer, img_B3HW.to(RELEASE_DTYPE))
        final, indices = quantize(self.tokenizer.quantizer, f)
        return final.flatten(2).transpose(1, 2), indices

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.encode(img_B3HW)[0]
