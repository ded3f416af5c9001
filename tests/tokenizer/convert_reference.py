"""Test helpers for the converter, written from tests/data/official_layout.md alone (no model code):

- `official_layout(spec)`: every key and shape of an official TokenFlow state dict, in order, for
  an architecture spec (full size reproduces the official TSV listings; reduced sizes keep the
  same structure so tests run in seconds);
- `fabricate(spec)`: random values for that layout, scaled so activations stay finite;
- `reference_encode(sd, img, spec)`: the official encode path ("What encode does") with plain
  torch ops over the raw official-layout state dict; returns indices and the smallest margin
  between the best and second-best joint distance (how far from a tie every choice was).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Layout = list[tuple[str, tuple[int, ...], str]]  # (key, shape, "parameter" | "buffer")


@dataclass(frozen=True)
class OfficialSpec:
    tower: str = "clip"  # "clip" (OpenAI layout) or "siglip" (transformers 4.43 layout)
    ch: int = 128  # pixel encoder base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res: int = 2
    dec_ch: int = 128  # 256 enhanced
    dec_res: int = 3  # 5 enhanced
    z: int = 256
    sem_dim: int = 32
    pix_dim: int = 8
    codebook: int = 32768
    width: int = 768  # semantic tower width D
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    patch: int = 16
    tower_grid: int = 14  # trained position grid of the tower
    dec_width: int = 768
    dec_depth: int = 3
    dec_heads: int = 12  # not in the state dict; used by the reference
    dec_mlp: int = 3072
    dec_grid: int = 14
    teacher_dim: int = 512
    groups: int = 32  # GroupNorm groups (not in the state dict; used by the reference)
    scales: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14)
    image_size: int = 224
    pixel_size: int = 0  # pixel branch input (siglip: 432); 0 = image_size


CLIPB_224 = OfficialSpec()
CLIPB_224_ENHANCED = OfficialSpec(dec_ch=256, dec_res=5, scales=(1, 2, 4, 6, 8, 10, 12, 14, 16), image_size=256)
SIGLIP_384 = OfficialSpec(
    tower="siglip", width=1152, layers=27, heads=16, mlp=4304, patch=14, tower_grid=27, dec_width=1152,
    dec_mlp=4608, dec_grid=27, teacher_dim=1152, scales=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27),
    image_size=384, pixel_size=432,
)  # fmt: skip


def _norm(p: str, c: int) -> Layout:
    return [(f"{p}.weight", (c,), "parameter"), (f"{p}.bias", (c,), "parameter")]


def _conv(p: str, o: int, i: int, k: int, bias: bool = True) -> Layout:
    out = [(f"{p}.weight", (o, i, k, k), "parameter")]
    return out + ([(f"{p}.bias", (o,), "parameter")] if bias else [])


def _linear(p: str, o: int, i: int, bias: bool = True) -> Layout:
    return [(f"{p}.weight", (o, i), "parameter")] + ([(f"{p}.bias", (o,), "parameter")] if bias else [])


def _res(p: str, i: int, o: int) -> Layout:
    out = _norm(f"{p}.norm1", i) + _conv(f"{p}.conv1", o, i, 3) + _norm(f"{p}.norm2", o) + _conv(f"{p}.conv2", o, o, 3)
    return out + (_conv(f"{p}.nin_shortcut", o, i, 1) if i != o else [])


def _attn(p: str, c: int) -> Layout:
    return _norm(f"{p}.norm", c) + [kv for n in ("q", "k", "v", "proj_out") for kv in _conv(f"{p}.{n}", c, c, 1)]


def _mid(p: str, c: int) -> Layout:
    return _res(f"{p}.0", c, c) + _attn(f"{p}.1", c) + _res(f"{p}.2", c, c)


def _pixel(s: OfficialSpec) -> Layout:
    enc_w = [s.ch * m for m in s.ch_mult]
    out = _conv("encoder.conv_in", s.ch, 3, 3)
    for i, w in enumerate(enc_w):
        prev = s.ch if i == 0 else enc_w[i - 1]
        out += [r for j in range(s.enc_res) for r in _res(f"encoder.conv_blocks.{i}.res.{j}", prev if j == 0 else w, w)]
        if i == len(enc_w) - 1:
            out += [a for j in range(s.enc_res) for a in _attn(f"encoder.conv_blocks.{i}.attn.{j}", w)]
        else:
            out += _conv(f"encoder.conv_blocks.{i}.downsample.conv", w, w, 3)
    out += _mid("encoder.mid", enc_w[-1]) + _norm("encoder.norm_out", enc_w[-1])
    out += _conv("encoder.conv_out", s.z, enc_w[-1], 3)
    dec_w = [s.dec_ch * m for m in reversed(s.ch_mult)]
    out += _conv("decoder.conv_in", dec_w[0], s.z, 3) + _mid("decoder.mid", dec_w[0])
    for i, w in enumerate(dec_w):
        prev = dec_w[0] if i == 0 else dec_w[i - 1]
        out += [r for j in range(s.dec_res) for r in _res(f"decoder.conv_blocks.{i}.res.{j}", prev if j == 0 else w, w)]
        if i == 0:
            out += [a for j in range(s.dec_res) for a in _attn(f"decoder.conv_blocks.{i}.attn.{j}", w)]
        if i != len(dec_w) - 1:
            out += _conv(f"decoder.conv_blocks.{i}.upsample.conv", w, w, 3)
    out += _norm("decoder.norm_out", dec_w[-1]) + _conv("decoder.conv_out", 3, dec_w[-1], 3)
    return out + _conv("quant_conv", s.pix_dim, s.z, 1) + _conv("post_quant_conv", s.z, s.pix_dim, 1)


def _clip_tower(s: OfficialSpec) -> Layout:
    p, D = "encoder_vqkd", s.width
    out = [
        (f"{p}.class_embedding", (D,), "parameter"),
        (f"{p}.positional_embedding", (s.tower_grid**2 + 1, D), "parameter"),
    ]
    out += _conv(f"{p}.conv1", D, 3, s.patch, bias=False) + _norm(f"{p}.ln_pre", D)
    for i in range(s.layers):
        b = f"{p}.transformer.resblocks.{i}"
        out += [
            (f"{b}.attn.in_proj_weight", (3 * D, D), "parameter"),
            (f"{b}.attn.in_proj_bias", (3 * D,), "parameter"),
        ]
        out += _linear(f"{b}.attn.out_proj", D, D) + _norm(f"{b}.ln_1", D)
        out += _linear(f"{b}.mlp.c_fc", s.mlp, D) + _linear(f"{b}.mlp.c_proj", D, s.mlp) + _norm(f"{b}.ln_2", D)
    return out + _norm(f"{p}.ln_post", D)


def _siglip_tower(s: OfficialSpec) -> Layout:
    p, D = "encoder_vqkd.vision_model", s.width
    out = _conv(f"{p}.embeddings.patch_embedding", D, 3, s.patch)
    out += [(f"{p}.embeddings.position_embedding.weight", (s.tower_grid**2, D), "parameter")]
    for i in range(s.layers):
        b = f"{p}.encoder.layers.{i}"
        out += [kv for n in ("k_proj", "v_proj", "q_proj", "out_proj") for kv in _linear(f"{b}.self_attn.{n}", D, D)]
        out += _norm(f"{b}.layer_norm1", D) + _linear(f"{b}.mlp.fc1", s.mlp, D) + _linear(f"{b}.mlp.fc2", D, s.mlp)
        out += _norm(f"{b}.layer_norm2", D)
    out += _norm(f"{p}.post_layernorm", D) + [(f"{p}.head.probe", (1, 1, D), "parameter")]
    out += [(f"{p}.head.attention.in_proj_weight", (3 * D, D), "parameter")]
    out += [(f"{p}.head.attention.in_proj_bias", (3 * D,), "parameter")] + _linear(f"{p}.head.attention.out_proj", D, D)
    return (
        out
        + _norm(f"{p}.head.layernorm", D)
        + _linear(f"{p}.head.mlp.fc1", s.mlp, D)
        + _linear(f"{p}.head.mlp.fc2", D, s.mlp)
    )


def _semantic_rest(s: OfficialSpec) -> Layout:
    p, D = "decoder_vqkd", s.dec_width
    out = [(f"{p}.cls_token", (1, 1, D), "parameter"), (f"{p}.pos_embed", (1, s.dec_grid**2 + 1, D), "parameter")]
    out += _conv(f"{p}.patch_embed.proj", D, s.sem_dim, 1)
    for i in range(s.dec_depth):
        b = f"{p}.blocks.{i}"
        out += _norm(f"{b}.norm1", D) + [
            (f"{b}.attn.q_bias", (D,), "parameter"),
            (f"{b}.attn.v_bias", (D,), "parameter"),
        ]
        out += _linear(f"{b}.attn.qkv", 3 * D, D, bias=False) + _linear(f"{b}.attn.proj", D, D) + _norm(f"{b}.norm2", D)
        out += _linear(f"{b}.mlp.fc1", s.dec_mlp, D) + _linear(f"{b}.mlp.fc2", D, s.dec_mlp)
    out += _norm(f"{p}.fc_norm", D)
    out += _linear("encode_task_layer.0", s.width, s.width) + _linear("encode_task_layer.2", s.sem_dim, s.width)
    out += _linear("decode_task_layer.0", D, D) + _linear("decode_task_layer.2", s.teacher_dim, D)
    if s.tower == "siglip":
        out += [("scaling_layer.shift", (1, 3, 1, 1), "buffer"), ("scaling_layer.scale", (1, 3, 1, 1), "buffer")]
    out += [("quantize.codebook_used", (4 * s.codebook,), "buffer")]
    return out + [
        ("quantize.embedding_vqkd.weight", (s.codebook, s.sem_dim), "parameter"),
        ("quantize.embedding_vqgan.weight", (s.codebook, s.pix_dim), "parameter"),
    ]


def official_layout(s: OfficialSpec) -> Layout:
    tower = _clip_tower(s) if s.tower == "clip" else _siglip_tower(s)
    return _pixel(s) + tower + _semantic_rest(s)


def fabricate(s: OfficialSpec, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random values for every key: weights ~ N(0, 1/fan_in), norm scales ~ 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape, _ in official_layout(s):
        if key.startswith("scaling_layer."):  # tiny and checked by value, so real even on meta
            sd[key] = torch.full(shape, 0.5)
        elif device == "meta":
            sd[key] = torch.empty(shape, device="meta")
        elif key == "quantize.codebook_used":
            sd[key] = torch.zeros(shape)
        elif len(shape) >= 2 and "embedding_vq" not in key:
            fan_in = (
                math.prod(shape[1:]) if not key.endswith(("positional_embedding", "position_embedding.weight")) else 64
            )
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif "embedding_vq" in key:
            sd[key] = torch.randn(shape, generator=g)
        elif key.endswith("weight") and ("norm" in key or ".ln_" in key):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


# --------------------------------------------------------------------------------------------
# Reference encode (README "What encode does"), plain torch ops over official keys
# --------------------------------------------------------------------------------------------


def _gn(sd: dict, p: str, x: torch.Tensor, groups: int) -> torch.Tensor:
    return F.group_norm(x, groups, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _c(sd: dict, p: str, x: torch.Tensor, **kw) -> torch.Tensor:
    return F.conv2d(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"), **kw)


def _ref_res(sd: dict, p: str, x: torch.Tensor, g: int) -> torch.Tensor:
    h = _c(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x, g)), padding=1)
    h = _c(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h, g)), padding=1)
    return (_c(sd, f"{p}.nin_shortcut", x) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _ref_attn(sd: dict, p: str, x: torch.Tensor, g: int) -> torch.Tensor:
    B, C, H, W = x.shape
    n = _gn(sd, f"{p}.norm", x, g)
    q, k, v = (_c(sd, f"{p}.{m}", n).reshape(B, C, H * W) for m in "qkv")
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C**-0.5, dim=2)  # (B, query, key)
    out = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
    return x + _c(sd, f"{p}.proj_out", out)


def ref_pixel_encoder(sd: dict, x: torch.Tensor, g: int) -> torch.Tensor:
    h = _c(sd, "encoder.conv_in", x, padding=1)
    i = 0
    while f"encoder.conv_blocks.{i}.res.0.conv1.weight" in sd:
        p = f"encoder.conv_blocks.{i}"
        j = 0
        while f"{p}.res.{j}.conv1.weight" in sd:
            h = _ref_res(sd, f"{p}.res.{j}", h, g)
            if f"{p}.attn.{j}.q.weight" in sd:
                h = _ref_attn(sd, f"{p}.attn.{j}", h, g)
            j += 1
        if f"{p}.downsample.conv.weight" in sd:  # zero pad right and bottom, stride-2 3x3
            h = _c(sd, f"{p}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
        i += 1
    h = _ref_res(sd, "encoder.mid.2", _ref_attn(sd, "encoder.mid.1", _ref_res(sd, "encoder.mid.0", h, g), g), g)
    return _c(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h, g)), padding=1)


def _ln(sd: dict, p: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, D = q.shape
    q, k, v = (t.reshape(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, L, D)


def _dino_resize(table: torch.Tensor, g: int) -> torch.Tensor:
    g0 = math.isqrt(table.shape[0])
    if g == g0:
        return table
    grid = table.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((g + 0.1) / g0, (g + 0.1) / g0), mode="bicubic")
    return grid.permute(0, 2, 3, 1).reshape(g * g, -1)


def ref_clip_tokens(sd: dict, x: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    p = "encoder_vqkd"
    t = F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s.patch)  # [-1, 1] image, no CLIP mean/std
    B, D, g, _ = t.shape
    t = torch.cat([sd[f"{p}.class_embedding"].expand(B, 1, D), t.flatten(2).transpose(1, 2)], dim=1)
    pos = sd[f"{p}.positional_embedding"]
    t = _ln(sd, f"{p}.ln_pre", t + torch.cat([pos[:1], _dino_resize(pos[1:], g)]), 1e-5)
    for i in range(s.layers):
        b = f"{p}.transformer.resblocks.{i}"
        h = _ln(sd, f"{b}.ln_1", t, 1e-5)
        q, k, v = F.linear(h, sd[f"{b}.attn.in_proj_weight"], sd[f"{b}.attn.in_proj_bias"]).chunk(3, dim=-1)
        t = t + F.linear(_mha(q, k, v, s.heads), sd[f"{b}.attn.out_proj.weight"], sd[f"{b}.attn.out_proj.bias"])
        h = F.linear(_ln(sd, f"{b}.ln_2", t, 1e-5), sd[f"{b}.mlp.c_fc.weight"], sd[f"{b}.mlp.c_fc.bias"])
        t = t + F.linear(h * torch.sigmoid(1.702 * h), sd[f"{b}.mlp.c_proj.weight"], sd[f"{b}.mlp.c_proj.bias"])
    return _ln(sd, f"{p}.ln_post", t, 1e-5)[:, 1:]  # ln_post on every token, class token dropped


def ref_siglip_tokens(sd: dict, x: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    p = "encoder_vqkd.vision_model"
    x = (((x + 1) / 2).clamp(0, 1) - sd["scaling_layer.shift"]) / sd["scaling_layer.scale"]
    t = _c(sd, f"{p}.embeddings.patch_embedding", x, stride=s.patch).flatten(2).transpose(1, 2)
    t = t + sd[f"{p}.embeddings.position_embedding.weight"]
    for i in range(s.layers - 1):  # penultimate hidden state: the last layer's output is unused
        b = f"{p}.encoder.layers.{i}"
        h = _ln(sd, f"{b}.layer_norm1", t, 1e-6)
        q, k, v = (F.linear(h, sd[f"{b}.self_attn.{n}_proj.weight"], sd[f"{b}.self_attn.{n}_proj.bias"]) for n in "qkv")
        t = t + F.linear(
            _mha(q, k, v, s.heads), sd[f"{b}.self_attn.out_proj.weight"], sd[f"{b}.self_attn.out_proj.bias"]
        )
        h = F.linear(_ln(sd, f"{b}.layer_norm2", t, 1e-6), sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"])
        t = t + F.linear(F.gelu(h, approximate="tanh"), sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
    return t


def ref_features(sd: dict, img: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    """The 40-channel map before quantisation: semantic 32 channels, then pixel 8."""
    tokens = ref_clip_tokens(sd, img, s) if s.tower == "clip" else ref_siglip_tokens(sd, img, s)
    h = torch.tanh(F.linear(tokens, sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"]))
    sem = F.linear(h, sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"])
    B, N, _ = sem.shape
    g = math.isqrt(N)
    sem = sem.transpose(1, 2).reshape(B, -1, g, g)
    pix_in = img
    if s.pixel_size and s.pixel_size != img.shape[-1]:
        pix_in = F.interpolate(img, size=(s.pixel_size, s.pixel_size), mode="bicubic")
    pix = _c(sd, "quant_conv", ref_pixel_encoder(sd, pix_in, s.groups))
    return torch.cat([sem, pix], dim=1)


def reference_encode(sd: dict, img: torch.Tensor, s: OfficialSpec) -> tuple[torch.Tensor, float]:
    """(B, L) indices and the smallest best-vs-second-best distance gap over all choices."""
    f = ref_features(sd, img, s)
    B, _, G, _ = f.shape
    cb_sem = F.normalize(sd["quantize.embedding_vqkd.weight"], dim=1)
    cb_pix = F.normalize(sd["quantize.embedding_vqgan.weight"], dim=1)
    residual, out, margin = f.clone(), [], math.inf
    for si, sc in enumerate(s.scales):
        r = residual if si == len(s.scales) - 1 else F.interpolate(residual, size=(sc, sc), mode="area")
        z = r.permute(0, 2, 3, 1).reshape(-1, s.sem_dim + s.pix_dim)
        z_sem, z_pix = F.normalize(z[:, : s.sem_dim], dim=1), F.normalize(z[:, s.sem_dim :], dim=1)
        d = torch.cdist(z_sem, cb_sem).pow(2) + torch.cdist(z_pix, cb_pix).pow(2)  # equal weights
        two = d.topk(2, dim=1, largest=False).values
        margin = min(margin, float((two[:, 1] - two[:, 0]).min()))
        idx = d.argmin(dim=1)
        code = torch.cat([cb_sem[idx], cb_pix[idx]], dim=1).reshape(B, sc, sc, -1).permute(0, 3, 1, 2)
        up = code if sc == G else F.interpolate(code, size=(G, G), mode="bicubic")
        residual = residual - up
        out.append(idx.reshape(B, sc * sc))
    return torch.cat(out, dim=1), margin


# --------------------------------------------------------------------------------------------
# Reference decode (README "What decode does")
# --------------------------------------------------------------------------------------------


def ref_indices_to_features(sd: dict, idx: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    """Index path: normalised concatenated codes per scale, bicubic to the final grid, summed."""
    cb = torch.cat(
        [
            F.normalize(sd["quantize.embedding_vqkd.weight"], dim=1),
            F.normalize(sd["quantize.embedding_vqgan.weight"], dim=1),
        ],
        1,
    )
    G, B, start, f = s.scales[-1], idx.shape[0], 0, 0
    for sc in s.scales:
        code = cb[idx[:, start : start + sc * sc]].reshape(B, sc, sc, -1).permute(0, 3, 1, 2)
        f = f + (code if sc == G else F.interpolate(code, size=(G, G), mode="bicubic"))
        start += sc * sc
    return f


def ref_decode_pixels(sd: dict, f: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    g = s.groups
    h = _c(sd, "decoder.conv_in", _c(sd, "post_quant_conv", f[:, s.sem_dim :]), padding=1)
    h = _ref_res(sd, "decoder.mid.2", _ref_attn(sd, "decoder.mid.1", _ref_res(sd, "decoder.mid.0", h, g), g), g)
    i = 0
    while f"decoder.conv_blocks.{i}.res.0.conv1.weight" in sd:
        p, j = f"decoder.conv_blocks.{i}", 0
        while f"{p}.res.{j}.conv1.weight" in sd:
            h = _ref_res(sd, f"{p}.res.{j}", h, g)
            if f"{p}.attn.{j}.q.weight" in sd:
                h = _ref_attn(sd, f"{p}.attn.{j}", h, g)
            j += 1
        if f"{p}.upsample.conv.weight" in sd:
            h = _c(sd, f"{p}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
        i += 1
    img = _c(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h, g)), padding=1)
    if img.shape[-1] != s.image_size:  # siglip: the 432 image back to 384
        img = F.interpolate(img, size=(s.image_size, s.image_size), mode="bicubic")
    return img


def ref_decode_semantic(sd: dict, f: torch.Tensor, s: OfficialSpec) -> torch.Tensor:
    """decoder_vqkd (BEiT-v2 ViT, q/v biases, exact GELU, eps 1e-6) then decode_task_layer."""
    p = "decoder_vqkd"
    t = _c(sd, f"{p}.patch_embed.proj", f[:, : s.sem_dim])
    B, D, G, _ = t.shape
    pos = sd[f"{p}.pos_embed"][0]
    t = torch.cat([sd[f"{p}.cls_token"].expand(B, 1, D), t.flatten(2).transpose(1, 2)], dim=1)
    t = t + torch.cat([pos[:1], _dino_resize(pos[1:], G)])
    for i in range(s.dec_depth):
        b = f"{p}.blocks.{i}"
        h = _ln(sd, f"{b}.norm1", t, 1e-6)
        bias = torch.cat([sd[f"{b}.attn.q_bias"], torch.zeros_like(sd[f"{b}.attn.v_bias"]), sd[f"{b}.attn.v_bias"]])
        q, k, v = F.linear(h, sd[f"{b}.attn.qkv.weight"], bias).chunk(3, dim=-1)
        t = t + F.linear(_mha(q, k, v, s.dec_heads), sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        h = F.gelu(F.linear(_ln(sd, f"{b}.norm2", t, 1e-6), sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"]))
        t = t + F.linear(h, sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
    t = _ln(sd, f"{p}.fc_norm", t[:, 1:], 1e-6)  # class token dropped, then fc_norm
    h = torch.tanh(F.linear(t, sd["decode_task_layer.0.weight"], sd["decode_task_layer.0.bias"]))
    return F.linear(h, sd["decode_task_layer.2.weight"], sd["decode_task_layer.2.bias"])
