"""Config dataclasses for the text-to-image generator (`train-generator`, `generate`,
`eval geneval`), loaded with `config.load_recipe(path, GeneratorRecipe)`.

Sections: `model` (GeneratorModelConfig), `data` (GeneratorDataConfig), `train`
(config.TrainConfig, shared with every other stage) and `eval` (GeneratorEvalConfig).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokenflow_cli.config import ConfigError, TrainConfig, register_recipe_kind


@dataclass
class GeneratorModelConfig:
    """Next-scale text-to-image LM on a transformers decoder-only model (Llama by default)."""

    name: str = "generator"  # free-form identifier stored in checkpoints
    # The language model: a local Hugging Face folder (loaded with local_files_only=True, as the
    # official recipe initialises from Llama-2-7B), or "" to build `lm_arch` from the fields below.
    lm_path: str = ""
    # Block layout built from scratch when lm_path is "" (generation/lm.py LM_ARCHS): "llama"
    # (pre-norm) or "llama-qknorm-postnorm" (the official t2i block: per-head QK RMSNorm, norm
    # after each branch).
    lm_arch: str = "llama"
    lm_dtype: str = "fp32"  # weights dtype of a pretrained LM: "fp32", "bf16" or "fp16"
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads gives grouped-query attention
    intermediate_size: int = 11008  # SwiGLU width
    rms_norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6  # epsilon of the per-head QK RMSNorm (lm_arch llama-qknorm-postnorm)
    rope_theta: float = 10000.0
    text_vocab_size: int = 32000  # set from the text tokenizer by train-generator
    attn_implementation: str = "sdpa"  # "sdpa" or "eager": both take our 4D block-causal mask
    gradient_checkpointing: bool = False  # trade compute for memory in the LM blocks (training)
    max_text_tokens: int = 64  # prompts are left-padded (or truncated) to this many tokens
    # How prompts become the text block (generation/prompts.py TEXT_LAYOUTS): "padded" (BOS +
    # prompt, left-padded to the batch's longest) or "official" (always max_text_tokens ids,
    # then the `<img>` marker; text positions add the first scale embedding).
    text_layout: str = "padded"
    image_marker_ids: tuple[int, ...] = ()  # ids of the text `<img>` (text_layout official)
    # Next-scale inputs (generation/next_scale.py NEXT_SCALE_INPUTS): "var" (sum at the final
    # grid, area-downsampled) or "chained" (official: add at s_k, bicubic to s_{k+1}).
    next_scale_input: str = "var"
    # Multi-step sampling (generation/multistep.py MULTI_STEP): "refine" (our trained draft
    # projector block) or "inplace" (official: scale k re-run with its draft in its input).
    multi_step: str = "refine"
    # The image head (generation/model.py IMAGE_HEADS): "separate" (Linear with bias over K) or
    # "shared-vocabulary" (official: the image rows of one text+image LM head, no bias).
    image_head: str = "separate"
    # What `generate` uses when not told (generation/sampling.py SAMPLER_DEFAULTS): "ours" or
    # "official" (one pass (600, 0.6), cfg 7.5 with the official negative prompt, top-k ties kept).
    sampler_defaults: str = "ours"
    # The image tokenizer's code space. Recipes leave it empty: `attach_code_space` copies it from
    # the image tokenizer the generator is trained for (and saved checkpoints carry it). A value
    # set in a recipe pins it, and a tokenizer that disagrees is an error.
    scales: tuple[int, ...] = ()  # side of each token map; () = the tokenizer's
    codebook_size: int = 0  # K: logits are over these image codes (a separate head); 0 = the tokenizer's
    code_dim: int = 0  # width of one code vector (semantic + pixel); 0 = the tokenizer's
    init_std: float = 0.02  # std of the new parts (projectors, embeddings, head)
    # multi_step "refine" is trained on a share of batches with corrupted ground-truth drafts
    # (generation/stage.py); "inplace" is untrained and ignores these.
    refine_prob: float = 0.5  # share of training batches that add one refine block
    refine_noise: float = 0.5  # a draft's codes are replaced at random with rate ~ U(0, this)


@dataclass
class GeneratorDataConfig:
    """Captioned images: a codes file from `tokenize` (images encoded once) or an image folder."""

    codes: str = ""  # codes .npz (or a shard glob) from `tokenflow tokenize`; preferred
    images: str = ""  # image folder / glob / list, encoded with `tokenizer` on the fly if no codes
    captions: str = ""  # .jsonl with {"image", "caption"}; matched to codes/images by path
    caption_fields: tuple[str, ...] = ("caption",)  # each item uses one of these, drawn at random
    tokenizer: str = ""  # image tokenizer checkpoint or run folder ("" = the default tokenizer)
    text_tokenizer: str = ""  # tokenizer.json / HF folder; "" = train a BPE on the captions
    text_vocab_size: int = 1024  # vocabulary of the BPE trained on the captions
    caption_dropout: float = 0.1  # share of captions replaced by "" (or a negative prompt) for CFG
    negative_prompts: tuple[str, ...] = ()  # dropped captions become one of these when given
    image_size: int = 256  # resize/centre-crop size when encoding images on the fly
    num_workers: int = 0


@dataclass
class GeneratorEvalConfig:
    batch_size: int = 8
    samples_per_prompt: int = 4  # GenEval draws 4 images per prompt
    schedule: str = "two-pass"  # preset name or "k:p,k:p"
    cfg: float = 3.0  # guidance strength at the last scale (linear ramp from 0)
    temperature: float = 1.0
    seed: int = 0
    limit: int = 0  # prompts used (0 = all)


@register_recipe_kind("generator")
@dataclass
class GeneratorRecipe:
    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GeneratorEvalConfig = field(default_factory=GeneratorEvalConfig)


def attach_code_space(cfg: GeneratorModelConfig, scales: tuple[int, ...], codebook_size: int,
                      code_dim: int) -> GeneratorModelConfig:
    """`cfg` with the image tokenizer's code space filled in; a field the recipe pinned must agree."""
    if len(scales) < 2:
        raise ConfigError(f"the image tokenizer has one scale ({scales[0]} x {scales[0]}): next-scale "
                          "generation predicts each scale from the coarser ones and needs several; use a "
                          "multi-scale tokenizer (e.g. shapes-toy, clipb-256) for text-to-image")
    tokenizer_space = {"scales": tuple(scales), "codebook_size": codebook_size, "code_dim": code_dim}
    for key, value in tokenizer_space.items():
        pinned = getattr(cfg, key)
        if pinned and (tuple(pinned) if key == "scales" else pinned) != value:
            raise ConfigError(f"model.{key}={pinned!r} does not match the image tokenizer's {value!r}; "
                              f"remove it from the recipe (it is taken from the tokenizer)")
    return dataclasses.replace(cfg, **tokenizer_space)
