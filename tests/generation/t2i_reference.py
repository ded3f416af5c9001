"""Our own reference of the official TokenFlow-t2i computation, written from the measured facts
(tests/data/T2I.md), for tests only: it works on the official state-dict names and
the official sequence (text + image ids, the image features in place of the image ids, the
zero placeholder, level and absolute position embeddings added by sequence index, one causal
mask with pad keys hidden and the block-causal image block written over it), recomputes
everything at every sampler call, and samples like `autoregressive_infer_cfg`.

`make_official_folder` writes a tiny random model in that layout as a hub-style folder
(config.json, sharded safetensors with an index or sharded .bin with an index, a sentencepiece
tokenizer.model with `[PAD]` and the `<vq_token_i>` ids), as a user would have it. Its key names
are those of `tests/data/tokenflow_t2i_llama2_7b_keys.tsv` (checked by a test), never the names
the converter happens to expect. The folder the official code itself saved, and what the official
sampler computed on it, are in `tests/data/official/` (test_t2i_official.py uses both).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

PROMPT_TOKENS = 128
TEXTS = ["a photo of a red circle", "a blue square left of a green star", "<img> lowres, bad anatomy, text, error",
         "two yellow triangles", "worst quality, low quality, blurry. jpeg artifacts"]


@dataclass
class TinyT2I:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 96
    rms_eps: float = 1e-5
    qk_eps: float = 1e-6
    theta: float = 10000.0
    text_vocab: int = 0  # sentencepiece pieces; [PAD] = text_vocab, images start at text_vocab + 1
    codebook_size: int = 64
    code_dim: int = 40
    scales: tuple[int, ...] = (1, 2, 4, 16)

    @property
    def image_token_start(self) -> int:
        return self.text_vocab + 1

    @property
    def vocab(self) -> int:
        return self.image_token_start + self.codebook_size

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def official_state(c: TinyT2I, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names (larger than init so that every part matters)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    H, hd = c.hidden, c.hidden // c.heads
    state = {"model.embed_tokens.weight": rnd(c.vocab, H), "model.norm.weight": rnd(H, mean=1.0),
             "lm_head.weight": rnd(c.vocab, H), "model.pos_1LC": rnd(c.num_tokens, H, std=0.1),
             "model.lvl_embed.weight": rnd(len(c.scales) + 1, H, std=0.1),
             "model.mm_projector.0.weight": rnd(H, c.code_dim), "model.mm_projector.0.bias": rnd(H),
             "model.mm_projector.2.weight": rnd(H, H), "model.mm_projector.2.bias": rnd(H),
             # registered on the causal LM itself: top-level keys (7B key table, official save path)
             "image_token_start": torch.tensor(c.image_token_start),
             "image_token_end": torch.tensor(c.vocab - 1)}
    for i in range(c.layers):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            state[p + f"self_attn.{name}_proj.weight"] = rnd(H, H)
        state[p + "self_attn.qknorm.query_norm.weight"] = rnd(hd, mean=1.0)
        state[p + "self_attn.qknorm.key_norm.weight"] = rnd(hd, mean=1.0)
        state[p + "mlp.gate_proj.weight"] = rnd(c.intermediate, H)
        state[p + "mlp.up_proj.weight"] = rnd(c.intermediate, H)
        state[p + "mlp.down_proj.weight"] = rnd(H, c.intermediate)
        state[p + "input_layernorm.weight"] = rnd(H, mean=1.0)
        state[p + "post_attention_layernorm.weight"] = rnd(H, mean=1.0)
    return state


def sentencepiece_model() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=buf, vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return buf.getvalue()


def _tokenizer_files(root: Path, c: TinyT2I, sp_model: bytes) -> None:
    """tokenizer.model + tokenizer_config.json listing [PAD] and the image tokens as added tokens."""
    (root / "tokenizer.model").write_bytes(sp_model)
    added = {str(c.text_vocab): "[PAD]"} | {str(c.image_token_start + i): f"<vq_token_{i}>"
                                            for i in range(c.codebook_size)}
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "[PAD]", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "added_tokens_decoder": {i: {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                           "normalized": False, "single_word": False} for i, t in added.items()}}
    (root / "tokenizer_config.json").write_text(json.dumps(config))


def make_official_folder(root: Path, c: TinyT2I, state: dict[str, torch.Tensor], fmt: str, shards: int = 2,
                         dtype: torch.dtype = torch.float32) -> Path:
    """A hub-style folder: config.json, `shards` weight files with an index, tokenizer files."""
    root.mkdir(parents=True)
    config = {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": c.hidden,
              "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.heads,
              "intermediate_size": c.intermediate, "rms_norm_eps": c.rms_eps, "rope_theta": c.theta,
              "vocab_size": c.vocab, "torch_dtype": str(dtype).removeprefix("torch."), "mm_hidden_size": c.code_dim,
              "vq_codebook_size": c.codebook_size, "tokenizer_model_max_length": 1024}
    (root / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    weight_map = {}
    for part in range(shards):
        chunk = {n: state[n].to(dtype) if state[n].is_floating_point() else state[n] for n in names[part::shards]}
        if fmt == "safetensors":
            file = f"model-{part + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in chunk.items()}, str(root / file))
        else:
            file = f"pytorch_model-{part + 1:05d}-of-{shards:05d}.bin"
            torch.save(chunk, root / file)
        weight_map.update(dict.fromkeys(chunk, file))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _tokenizer_files(root, c, sentencepiece_model())
    return root


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x_BhLd: torch.Tensor, theta: float) -> torch.Tensor:
    d, L = x_BhLd.shape[-1], x_BhLd.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(L, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x_BhLd[..., d // 2 :], x_BhLd[..., : d // 2]], -1)
    return x_BhLd * cos + half * sin


class OfficialReference:
    """The official forward and sampler on a state dict under the official names."""

    def __init__(self, c: TinyT2I, state: dict[str, torch.Tensor], codebook_KC: torch.Tensor, pad_id: int) -> None:
        self.c, self.s, self.codebook, self.pad_id = c, {k: v.float() for k, v in state.items()}, codebook_KC, pad_id
        self.scale_of_code = torch.cat([torch.full((n * n,), i) for i, n in enumerate(c.scales)])

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """`crop_and_encode_text_and_img` without an image: BOS + ids, cut or [PAD]-left-padded to
        128, then the ids of `<img>`."""
        ids = tokenizer.encode(prompt)
        ids = ids if ids and ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id, *ids]
        ids = ids[:PROMPT_TOKENS] if len(ids) > PROMPT_TOKENS else [self.pad_id] * (PROMPT_TOKENS - len(ids)) + ids
        return ids + tokenizer("<img>", add_special_tokens=False)["input_ids"]

    def _features(self, codes_BL: torch.Tensor, pred_for_curr_shape: int | None) -> torch.Tensor:
        """vision_tokenizer.forward: chained inputs of codes 1..L-1 (B, L-1, C)."""
        B, scales = codes_BL.shape[0], self.c.scales
        vectors = self.codebook[codes_BL]
        without_first, current, cur, f_hat = [], [], 0, 0.0
        for i, s in enumerate(scales[:-1]):
            f_hat = f_hat + vectors[:, cur : cur + s * s].reshape(B, s, s, -1).permute(0, 3, 1, 2)
            current.append(f_hat.permute(0, 2, 3, 1).flatten(1, 2))
            f_hat = F.interpolate(f_hat, size=(scales[i + 1],) * 2, mode="bicubic")
            without_first.append(f_hat.permute(0, 2, 3, 1).flatten(1, 2))
            cur += s * s
        f_hat = f_hat + vectors[:, cur:].reshape(B, scales[-1], scales[-1], -1).permute(0, 3, 1, 2)
        current.append(f_hat.permute(0, 2, 3, 1).flatten(1, 2))
        if pred_for_curr_shape is not None:
            without_first[pred_for_curr_shape] = current[pred_for_curr_shape + 1]
        return torch.cat(without_first, dim=1)

    def _embeds(self, ids_BP: torch.Tensor, codes_BL: torch.Tensor, pred: int | None) -> torch.Tensor:
        s, P = self.s, ids_BP.shape[1]
        feats = self._features(codes_BL, pred)
        img = F.linear(F.gelu(F.linear(feats, s["model.mm_projector.0.weight"], s["model.mm_projector.0.bias"])),
                       s["model.mm_projector.2.weight"], s["model.mm_projector.2.bias"])
        x = torch.cat([s["model.embed_tokens.weight"][ids_BP], img, torch.zeros_like(img[:, :1])], dim=1)
        level = torch.zeros(x.shape[1], dtype=torch.long)
        level[P : P + self.c.num_tokens - 1] = self.scale_of_code[1:] + 1
        x = x + s["model.lvl_embed.weight"][level]
        pos = torch.zeros_like(x[0])
        pos[P - 1 : P - 1 + self.c.num_tokens] = s["model.pos_1LC"]
        return x + pos

    def _mask(self, ids_BP: torch.Tensor, length: int) -> torch.Tensor:
        B, P, L = ids_BP.shape[0], ids_BP.shape[1], self.c.num_tokens
        is_pad = torch.zeros(B, length, dtype=torch.bool)
        is_pad[:, :P] = ids_BP == self.pad_id
        allowed = torch.ones(length, length).tril().bool()[None] & ~is_pad[:, None, :]
        d = self.scale_of_code
        block = (d[:, None] >= d[None, :])[None].expand(B, -1, -1)
        allowed[:, P - 1 : P - 1 + L, P - 1 : P - 1 + L] = block
        minimum = torch.finfo(torch.float32).min
        return torch.zeros(B, 1, length, length).masked_fill(~allowed[:, None], minimum)

    def logits(self, ids_BP: torch.Tensor, codes_BL: torch.Tensor, length: int,
               pred: int | None = None) -> torch.Tensor:
        """Full-vocabulary logits (B, length, V) of the first `length` positions; `codes_BL` holds
        all L codes (placeholders where not drawn yet)."""
        c, s = self.c, self.s
        x = self._embeds(ids_BP, codes_BL, pred)
        mask = self._mask(ids_BP, x.shape[1])[..., :length, :length]  # built whole, then cut, as officially
        x = x[:, :length]
        B, T, H, hd = x.shape[0], x.shape[1], c.hidden, c.hidden // c.heads
        for i in range(c.layers):
            p = f"model.layers.{i}."
            q, k, v = (F.linear(x, s[p + f"self_attn.{n}_proj.weight"]).view(B, T, c.heads, hd).transpose(1, 2)
                       for n in "qkv")
            q = _rope(_rms(q, s[p + "self_attn.qknorm.query_norm.weight"], c.qk_eps), c.theta)
            k = _rope(_rms(k, s[p + "self_attn.qknorm.key_norm.weight"], c.qk_eps), c.theta)
            attn = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + mask, dim=-1) @ v
            attn = F.linear(attn.transpose(1, 2).reshape(B, T, H), s[p + "self_attn.o_proj.weight"])
            x = x + _rms(attn, s[p + "input_layernorm.weight"], c.rms_eps)
            gate, up = F.linear(x, s[p + "mlp.gate_proj.weight"]), F.linear(x, s[p + "mlp.up_proj.weight"])
            mlp = F.linear(F.silu(gate) * up, s[p + "mlp.down_proj.weight"])
            x = x + _rms(mlp, s[p + "post_attention_layernorm.weight"], c.rms_eps)
        return F.linear(_rms(x, s["model.norm.weight"], c.rms_eps), s["lm_head.weight"])

    def image_logits(self, ids_BP: torch.Tensor, codes_BL: torch.Tensor) -> torch.Tensor:
        """Teacher-forced image logits (B, L, K): positions P-1 .. P-2+L."""
        P, L, start = ids_BP.shape[1], self.c.num_tokens, self.c.image_token_start
        return self.logits(ids_BP, codes_BL, P - 1 + L)[:, P - 1 :, start : start + self.c.codebook_size]

    def sample(self, ids_BP: torch.Tensor, negative_BP: torch.Tensor, cfg: float, passes: int,
               draw: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """autoregressive_infer_cfg: recompute-all, in-place re-runs from scale 1. `draw(si, pass,
        guided_BlK)` picks the codes (guided image logits: the text logits are -inf)."""
        c, B = self.c, ids_BP.shape[0]
        both, N, start = torch.cat([ids_BP, negative_BP]), len(c.scales), c.image_token_start
        codes = torch.ones(B, c.num_tokens, dtype=torch.long)  # the official placeholder: image id start + 1
        cur = ids_BP.shape[1] - 1
        for si, pn in enumerate(c.scales):
            t = cfg * si / (N - 1)
            for loop in range(passes):
                pred = None if loop == 0 else si - 1
                length = cur + pn * pn if loop == 0 else cur
                logits = self.logits(both, codes.repeat(2, 1), length, pred)
                logits = logits[:, cur : cur + pn * pn] if loop == 0 else logits[:, cur - pn * pn : cur]
                guided = (1 + t) * logits[:B] - t * logits[B:]
                guided[..., :start] = -torch.inf
                first = cur - ids_BP.shape[1] + 1 - (0 if loop == 0 else pn * pn)
                codes[:, first : first + pn * pn] = draw(si, loop, guided[..., start : start + c.codebook_size])
                if loop == 0:
                    cur += pn * pn
                if si < 1:
                    break
        return codes
