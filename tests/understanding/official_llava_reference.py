"""A reference implementation of the official TokenFlow-LLaVA computation, written from the facts
in `tests/data/I2T.md` (no official code), and tiny hub folders in the official layout without
the embedded tokenizer copy. The official code's own run (embedded copy included) is in
`tests/data/official/` and tested by test_llava_official.py; this reference adds the sharded
layouts (.bin and safetensors shards with an index) and the hand-written Qwen2 forward.

The reference does everything the official way and shares nothing with our understanding
package: the prompt is built as `conv_qwen.get_prompt()` builds it and tokenised as
`tokenizer_image_token` does (split at `<image>`, each chunk with the *saved* tokenizer, which
has no `<image>` token); the features are `final_quantize` (each scale's l2-normalised code
vectors, upsampled bicubic to the final scale, summed; `vq_model.py:319-341`); the projector is
mlp2x_gelu on the raw official tensors; the LM is a hand-written Qwen2 forward (RMSNorm, RoPE,
grouped-query attention with q/k/v biases, SwiGLU) on the official state dict with positions
0..T-1 (`llava_arch.py` prepare_inputs_labels_for_multimodal, right padding, batch of one);
greedy decoding recomputes the whole sequence every step (no cache).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SYSTEM = "You are a helpful assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's own chat template inserts another default system prompt: the official one must not
QWEN_OWN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are Qwen, "
    "created by Alibaba Cloud.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "What color is the star? The star is red.",
    "How many circles are there? There are two circles.",
    "Is there a blue square at the top left? Yes, there is a blue square.",
    "Describe the image briefly. A green triangle and a yellow circle on grey.",
]


def build_text_tokenizer(out: Path):
    """A tiny byte-level BPE with Qwen's special tokens, trained offline, saved in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXTS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = QWEN_OWN_TEMPLATE
    tok.save_pretrained(out)
    return tok


def official_config(vocab_rows: int, mm_hidden: int) -> dict:
    """config.json of a tiny `LlavaQwenForCausalLM` (the released model's fields, tiny sizes)."""
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "max_window_layers": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 1024,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "vocab_size": vocab_rows,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": mm_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "/path/to/tokenflow_siglip_32k.pt",
        "mm_vision_vq_type": "TOKENFLOW",
        "tokenizer_model_max_length": 1024,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def official_state(config: dict, seed: int = 0) -> dict:
    """A random official state dict without the tokenizer copy (Qwen2 LM + mm_projector): a
    folder whose copy was stripped, converted with the tokenizer given. The embedded copy, as the
    official code saves and runs it, is tested on the official run (test_llava_official.py)."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    sd = {"model.embed_tokens.weight": rnd(v, d, scale=0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": rnd(d, d),
            p + "self_attn.q_proj.bias": rnd(d),
            p + "self_attn.k_proj.weight": rnd(kv, d),
            p + "self_attn.k_proj.bias": rnd(kv),
            p + "self_attn.v_proj.weight": rnd(kv, d),
            p + "self_attn.v_proj.bias": rnd(kv),
            p + "self_attn.o_proj.weight": rnd(d, d),
            p + "mlp.gate_proj.weight": rnd(f, d),
            p + "mlp.up_proj.weight": rnd(f, d),
            p + "mlp.down_proj.weight": rnd(d, f),
            p + "input_layernorm.weight": 1 + rnd(d),
            p + "post_attention_layernorm.weight": 1 + rnd(d),
        }
    sd |= {"model.norm.weight": 1 + rnd(d), "lm_head.weight": rnd(v, d, scale=0.5)}
    c = config["mm_hidden_size"]
    sd |= {
        "model.mm_projector.0.weight": rnd(d, c, scale=0.3),
        "model.mm_projector.0.bias": rnd(d),
        "model.mm_projector.2.weight": rnd(d, d, scale=0.2),
        "model.mm_projector.2.bias": rnd(d),
    }
    return sd


def write_official_folder(root: Path, state: dict, config: dict, tokenizer_dir: Path, layout: str) -> Path:
    """The hub folder: config.json, tokenizer files, weights as `safetensors` (3 shards + index)
    or `bin` (2 shards + index), the stored dtype as given."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    for file in tokenizer_dir.iterdir():
        (root / file.name).write_bytes(file.read_bytes())
    keys = list(state)
    cut = keys.index("model.layers.1.self_attn.q_proj.weight")
    if layout == "safetensors":
        parts = [keys[:cut], [k for k in keys[cut:] if "mm_projector" not in k and "vision_tower" not in k]]
        parts.append([k for k in keys if "mm_projector" in k or "vision_tower" in k])
        names = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
        index = "model.safetensors.index.json"
    else:
        parts, names = [keys[:cut], keys[cut:]], [f"pytorch_model-{i:05d}-of-00002.bin" for i in (1, 2)]
        index = "pytorch_model.bin.index.json"
    for part, name in zip(parts, names, strict=True):
        tensors = {k: state[k].contiguous() for k in part}
        if layout == "safetensors":
            save_file(tensors, str(root / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, root / name)
    weight_map = {k: name for part, name in zip(parts, names, strict=True) for k in part}
    (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


# ---------------------------------------------------------------------------- the computation


def reference_features(
    codebooks: tuple[torch.Tensor, torch.Tensor], idx_BL: torch.Tensor, scales: list[int], side: int
) -> torch.Tensor:
    """final_quantize as (B, side*side, C): per scale, the l2-normalised semantic | pixel code
    vectors as an s x s map, bicubic to side x side, summed; flattened row-major."""
    sem, pix = (F.normalize(cb.float(), dim=-1) for cb in codebooks)
    total, start = 0, 0
    for s in scales:
        idx = idx_BL[:, start : start + s * s]
        start += s * s
        codes_BlC = torch.cat([sem[idx], pix[idx]], dim=-1)
        map_BCss = codes_BlC.transpose(1, 2).reshape(idx.shape[0], -1, s, s)
        total = total + (map_BCss if s == side else F.interpolate(map_BCss, size=(side, side), mode="bicubic"))
    return total.flatten(2).transpose(1, 2)


def reference_prompt_ids(tokenizer, question: str) -> list[int]:
    """conv_qwen.get_prompt() with `<image>\\n` + question, then tokenizer_image_token: -200
    stands for the image."""
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\n{question}<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    return chunks[0] + [-200] + chunks[1]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qwen2_logits(state: dict, config: dict, emb_TD: torch.Tensor) -> torch.Tensor:
    """Hand-written Qwen2 decoder on the official state dict: (T, D) embeddings -> (T, V) logits."""
    T, D = emb_TD.shape
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps = D // H, config["rms_norm_eps"]
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    h = emb_TD
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms_norm(h, state[p + "input_layernorm.weight"], eps)
        q = F.linear(x, state[p + "self_attn.q_proj.weight"], state[p + "self_attn.q_proj.bias"])
        k = F.linear(x, state[p + "self_attn.k_proj.weight"], state[p + "self_attn.k_proj.bias"])
        v = F.linear(x, state[p + "self_attn.v_proj.weight"], state[p + "self_attn.v_proj.bias"])
        q = _rotate(q.view(T, H, hd).transpose(0, 1), cos, sin)  # (H, T, hd)
        k = _rotate(k.view(T, KV, hd).transpose(0, 1), cos, sin).repeat_interleave(H // KV, dim=0)
        v = v.view(T, KV, hd).transpose(0, 1).repeat_interleave(H // KV, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, dim=-1)
        h = h + F.linear((att @ v).transpose(0, 1).reshape(T, D), state[p + "self_attn.o_proj.weight"])
        x = _rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(F.linear(x, state[p + "mlp.gate_proj.weight"]))
        h = h + F.linear(gate * F.linear(x, state[p + "mlp.up_proj.weight"]), state[p + "mlp.down_proj.weight"])
    return F.linear(_rms_norm(h, state["model.norm.weight"], eps), state["lm_head.weight"])


def llava_logits(state: dict, config: dict, ids: list[int], features_NC: torch.Tensor) -> torch.Tensor:
    """The official forward of one prompt: -200 replaced by the projected features."""
    x = F.linear(features_NC, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
    vis_ND = F.linear(F.gelu(x), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    at = ids.index(-200)
    embed = state["model.embed_tokens.weight"]
    emb_TD = torch.cat([embed[ids[:at]], vis_ND, embed[ids[at + 1 :]]])
    return qwen2_logits(state, config, emb_TD)


def greedy_answer(state: dict, config: dict, ids: list[int], features_NC: torch.Tensor, stop: int, n: int) -> list[int]:
    """Greedy tokens until `stop` (excluded) or n tokens, recomputing the full sequence each step."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(llava_logits(state, config, ids + out, features_NC)[-1].argmax())
        if nxt == stop:
            break
        out.append(nxt)
    return out
