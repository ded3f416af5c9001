"""The official tokenizer computation, re-implemented, as the 1.0x baseline of benchmarks/inference.py.

Written after the official code (github.com/ByteFlow-AI/TokenFlow at 9812da0,
`tokenflow/tokenizer/vq_model.py`, `vqkd_model.py`, `clip/model.py`; none of it is copied here)
with plain torch ops over the raw official-layout state dict, keeping its ordering of operations
and its inference-time extras, since those are part of what the official code costs:

- swish as `x * sigmoid(x)` and QuickGELU as `x * sigmoid(1.702 x)` (two or three passes);
- pixel attention with two `bmm`s and an explicit softmax; BEiT and SigLIP (transformers 4.43,
  eager) attention with an explicit softmax; CLIP's `nn.MultiheadAttention(need_weights=False)`
  runs `scaled_dot_product_attention`, so that one does here too;
- every scale is area-resized and bicubic-resized, also where the size does not change;
- the quantizer forms both N x K distance matrices (`||z||^2 + ||e||^2 - 2 z.e`), their squared
  means (`vqkd_d_norm`, `vqgan_d_norm`), the one-hot encodings, and the straight-through sum
  `z + (z_q - z)`;
- SigLIP runs all 27 layers, `post_layernorm` and the attention-pooling head
  (`output_hidden_states=True`, then takes `hidden_states[-2]`);
- decode returns (semantic tokens, image), so the semantic decoder runs too.

Everything is fp32, NCHW, under `torch.no_grad()` (the official evaluation script's mode). The
random full-size weights come from tests/tokenizer/convert_reference.py (`fabricate`), and
`build_pair` converts them into our tokenizer with the converter's own `convert_state_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tokenizer"))

from convert_reference import (  # noqa: E402
    CLIPB_224_ENHANCED,
    SIGLIP_384,
    OfficialSpec,
    _dino_resize,
    _ln,
    fabricate,
    ref_decode_semantic,
)

from tokenflow_cli.tokenizer.convert import convert_state_dict, variant_config  # noqa: E402
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer, build_tokenizer  # noqa: E402

SPECS: dict[str, OfficialSpec] = {"clipb-256-enhanced": CLIPB_224_ENHANCED, "siglip-384": SIGLIP_384}
SD = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------- pixel CNN


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # official `nonlinearity`


def _gn(sd: SD, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(sd: SD, p: str, x: torch.Tensor, **kw) -> torch.Tensor:
    return F.conv2d(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"), **kw)


def _res(sd: SD, p: str, x: torch.Tensor) -> torch.Tensor:
    h = _conv(sd, f"{p}.conv1", _swish(_gn(sd, f"{p}.norm1", x)), padding=1)
    h = _conv(sd, f"{p}.conv2", _swish(_gn(sd, f"{p}.norm2", h)), padding=1)
    return (_conv(sd, f"{p}.nin_shortcut", x) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(sd: SD, p: str, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    n = _gn(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{m}", n) for m in "qkv")
    w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    out = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, f"{p}.proj_out", out)


def _levels(sd: SD, prefix: str, h: torch.Tensor) -> torch.Tensor:
    i = 0
    while f"{prefix}.conv_blocks.{i}.res.0.conv1.weight" in sd:
        p, j = f"{prefix}.conv_blocks.{i}", 0
        while f"{p}.res.{j}.conv1.weight" in sd:
            h = _res(sd, f"{p}.res.{j}", h)
            h = _attn(sd, f"{p}.attn.{j}", h) if f"{p}.attn.{j}.q.weight" in sd else h
            j += 1
        if f"{p}.downsample.conv.weight" in sd:
            h = _conv(sd, f"{p}.downsample.conv", F.pad(h, (0, 1, 0, 1), mode="constant", value=0), stride=2)
        if f"{p}.upsample.conv.weight" in sd:
            h = _conv(sd, f"{p}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
        i += 1
    return h


def _mid(sd: SD, prefix: str, h: torch.Tensor) -> torch.Tensor:
    return _res(sd, f"{prefix}.mid.2", _attn(sd, f"{prefix}.mid.1", _res(sd, f"{prefix}.mid.0", h)))


def pixel_encoder(sd: SD, x: torch.Tensor) -> torch.Tensor:
    h = _mid(sd, "encoder", _levels(sd, "encoder", _conv(sd, "encoder.conv_in", x, padding=1)))
    return _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", h)), padding=1)


def pixel_decoder(sd: SD, z: torch.Tensor) -> torch.Tensor:
    h = _levels(sd, "decoder", _mid(sd, "decoder", _conv(sd, "decoder.conv_in", z, padding=1)))
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)), padding=1)


# ------------------------------------------------------------------------------ semantic towers


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, D = t.shape
    return t.reshape(B, L, heads, D // heads).transpose(1, 2)


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, D = q.shape
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    a = torch.softmax((q @ k.transpose(-1, -2)) * (D // heads) ** -0.5, dim=-1, dtype=torch.float32)
    return (a @ v).transpose(1, 2).reshape(B, L, D)


def clip_tokens(sd: SD, x: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    p = "encoder_vqkd"
    t = F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s.patch)  # the [-1, 1] image, no CLIP mean/std
    B, D, g, _ = t.shape
    t = t.reshape(B, D, -1).permute(0, 2, 1)
    t = torch.cat([sd[f"{p}.class_embedding"] + t.new_zeros(B, 1, D), t], dim=1)
    pos = sd[f"{p}.positional_embedding"]
    t = _ln(sd, f"{p}.ln_pre", t + torch.cat([pos[:1], _dino_resize(pos[1:], g)]), 1e-5)
    for i in range(s.layers):
        b = f"{p}.transformer.resblocks.{i}"
        q, k, v = F.linear(_ln(sd, f"{b}.ln_1", t, 1e-5), sd[f"{b}.attn.in_proj_weight"],
                           sd[f"{b}.attn.in_proj_bias"]).chunk(3, dim=-1)  # fmt: skip
        a = F.scaled_dot_product_attention(*(_heads(z, s.heads) for z in (q, k, v))).transpose(1, 2).reshape(B, -1, D)
        t = t + F.linear(a, sd[f"{b}.attn.out_proj.weight"], sd[f"{b}.attn.out_proj.bias"])
        h = F.linear(_ln(sd, f"{b}.ln_2", t, 1e-5), sd[f"{b}.mlp.c_fc.weight"], sd[f"{b}.mlp.c_fc.bias"])
        t = t + F.linear(h * torch.sigmoid(1.702 * h), sd[f"{b}.mlp.c_proj.weight"], sd[f"{b}.mlp.c_proj.bias"])
    return _ln(sd, f"{p}.ln_post", t, 1e-5)[:, 1:]


def _siglip_layer(sd: SD, b: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    h = _ln(sd, f"{b}.layer_norm1", t, 1e-6)
    q, k, v = (F.linear(h, sd[f"{b}.self_attn.{n}_proj.weight"], sd[f"{b}.self_attn.{n}_proj.bias"]) for n in "qkv")
    t = t + F.linear(_eager_attention(q, k, v, heads), sd[f"{b}.self_attn.out_proj.weight"],
                     sd[f"{b}.self_attn.out_proj.bias"])  # fmt: skip
    h = F.linear(_ln(sd, f"{b}.layer_norm2", t, 1e-6), sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"])
    return t + F.linear(F.gelu(h, approximate="tanh"), sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])


def _siglip_head(sd: SD, t: torch.Tensor, heads: int) -> torch.Tensor:
    p = "encoder_vqkd.vision_model.head"
    w, bias = sd[f"{p}.attention.in_proj_weight"].chunk(3), sd[f"{p}.attention.in_proj_bias"].chunk(3)
    probe = sd[f"{p}.probe"].expand(t.shape[0], -1, -1)
    q, k, v = F.linear(probe, w[0], bias[0]), F.linear(t, w[1], bias[1]), F.linear(t, w[2], bias[2])
    a = F.scaled_dot_product_attention(*(_heads(z, heads) for z in (q, k, v))).transpose(1, 2).flatten(2)
    h = F.linear(a, sd[f"{p}.attention.out_proj.weight"], sd[f"{p}.attention.out_proj.bias"])
    m = F.linear(_ln(sd, f"{p}.layernorm", h, 1e-6), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])
    return h + F.linear(F.gelu(m, approximate="tanh"), sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])


def siglip_tokens(sd: SD, x: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    p = "encoder_vqkd.vision_model"
    x = (((x + 1) / 2).clamp(0, 1) - sd["scaling_layer.shift"]) / sd["scaling_layer.scale"]
    t = _conv(sd, f"{p}.embeddings.patch_embedding", x, stride=s.patch).flatten(2).transpose(1, 2)
    hidden = [t + sd[f"{p}.embeddings.position_embedding.weight"]]
    for i in range(s.layers):
        hidden.append(_siglip_layer(sd, f"{p}.encoder.layers.{i}", hidden[-1], s.heads))
    _siglip_head(sd, _ln(sd, f"{p}.post_layernorm", hidden[-1], 1e-6), s.heads)  # pooled output, unused
    return hidden[-2]


# ------------------------------------------------------------------------------ encode / decode


def _quantize(z_BChw: torch.Tensor, cb_sem: torch.Tensor, cb_pix: torch.Tensor, sem_dim: int):
    """One official `VectorQuantizer.forward` at inference: (straight-through codes, indices)."""
    z = torch.einsum("b c h w -> b h w c", z_BChw).contiguous()
    zf = z.view(-1, z.shape[-1])
    zf_sem, zf_pix = F.normalize(zf[:, :sem_dim], p=2, dim=-1), F.normalize(zf[:, sem_dim:], p=2, dim=-1)
    e_sem, e_pix = F.normalize(cb_sem, p=2, dim=-1), F.normalize(cb_pix, p=2, dim=-1)
    z = torch.cat([F.normalize(z[..., :sem_dim], p=2, dim=-1), F.normalize(z[..., sem_dim:], p=2, dim=-1)], dim=-1)
    d_sem = (zf_sem**2).sum(1, keepdim=True) + (e_sem**2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf_sem, e_sem.T)
    d_pix = (zf_pix**2).sum(1, keepdim=True) + (e_pix**2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf_pix, e_pix.T)
    torch.mean(torch.sum(d_sem**2, dim=-1)), torch.mean(torch.sum(d_pix**2, dim=-1))  # vqkd/vqgan_d_norm
    idx = torch.argmin(d_sem + 1.0 * d_pix, dim=1)
    z_q = torch.cat([e_sem, e_pix], dim=-1)[idx].view(z.shape)
    e_sem[idx], e_pix[idx], F.one_hot(idx, cb_sem.shape[0]).type(z.dtype)  # computed there, unused at inference
    z_q = z + (z_q - z)  # straight-through, as written there (changes the values by float rounding)
    return torch.einsum("b h w c -> b c h w", z_q), idx


@torch.no_grad()
def official_encode(sd: SD, img_B3HW: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    """(B, L) indices as the official `encode` computes them."""
    tokens = clip_tokens(sd, img_B3HW, s) if s.tower == "clip" else siglip_tokens(sd, img_B3HW, s)
    h = F.linear(torch.tanh(F.linear(tokens, sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"])),
                 sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"])  # fmt: skip
    B, N, _ = h.shape
    g = math.isqrt(N)
    sem = h.reshape(B, g, g, -1).permute(0, 3, 1, 2)
    pix_in = img_B3HW if s.tower == "clip" else F.interpolate(img_B3HW, size=(16 * g, 16 * g), mode="bicubic")
    residual = torch.cat([sem, _conv(sd, "quant_conv", pixel_encoder(sd, pix_in))], dim=1)
    cb_sem, cb_pix = sd["quantize.embedding_vqkd.weight"], sd["quantize.embedding_vqgan.weight"]
    out = []
    for sc in s.scales:
        q, idx = _quantize(F.interpolate(residual, size=(sc, sc), mode="area"), cb_sem, cb_pix, s.sem_dim)
        residual = residual - F.interpolate(q, size=(g, g), mode="bicubic")
        out.append(idx.reshape(-1, sc**2))
    return torch.cat(out, dim=1)


@torch.no_grad()
def official_decode(sd: SD, idx_BL: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    """`decode_code`: indices -> (B, 3, H, W); the semantic tokens are computed and dropped."""
    cb = torch.cat([F.normalize(sd["quantize.embedding_vqkd.weight"], p=2, dim=-1),
                    F.normalize(sd["quantize.embedding_vqgan.weight"], p=2, dim=-1)], dim=-1)  # fmt: skip
    G, B, pos, quant = s.scales[-1], idx_BL.shape[0], 0, 0.0
    for sc in s.scales:
        code = cb[idx_BL[:, pos : pos + sc * sc]].reshape(B, sc, sc, -1).permute(0, 3, 1, 2)
        quant = quant + F.interpolate(code, size=(G, G), mode="bicubic")
        pos += sc * sc
    ref_decode_semantic(sd, quant, s)
    img = pixel_decoder(sd, _conv(sd, "post_quant_conv", quant[:, s.sem_dim :]))
    return img if img.shape[-1] == s.image_size else F.interpolate(img, size=(s.image_size,) * 2, mode="bicubic")


# ------------------------------------------------------------------------------------- weights


def build_pair(layout: str, seed: int = 0) -> tuple[SD, TokenFlowTokenizer]:
    """Full-size random official weights and our tokenizer converted from them (fp32, eval)."""
    official = fabricate(SPECS[layout], seed=seed)
    cfg = variant_config(layout)
    ours, _ = convert_state_dict(official, cfg)
    cfg = dataclasses.replace(cfg, semantic_encoder=dataclasses.replace(cfg.semantic_encoder, pretrained=""))
    with torch.device("meta"):
        tok = build_tokenizer(cfg)
    tok.load_state_dict(ours, strict=True, assign=True)
    _materialize_meta_buffers(tok, cfg)
    return official, tok.eval()


def _materialize_meta_buffers(tok: TokenFlowTokenizer, cfg) -> None:
    """Non-persistent buffers (SigLIP's `position_ids`) are in no state dict, so `assign` leaves them on
    the meta device; take them from a CPU build."""
    missing = [name for name, buf in tok.named_buffers() if buf.is_meta]
    if not missing:
        return
    real = dict(build_tokenizer(cfg).named_buffers())
    for name in missing:
        owner, _, leaf = name.rpartition(".")
        tok.get_submodule(owner)._buffers[leaf] = real[name]


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (bicubic-upsampled noise, a stand-in for photos)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(1, size // 8), max(1, size // 8), generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic").clamp(-1, 1)
