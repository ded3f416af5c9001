"""Recipe dataclasses for the LLaVA-style understanding model (`tokenflow finetune-llava`).

Loaded with `config.load_recipe(path, LlavaRecipe)`, so `base:`, `--set` and the error messages
work as for every other recipe. Stage 1 (projector only, LLaVA's caption pretraining) and stage 2
(LLM + projector, instruction tuning) share one recipe: `train` is stage 2 and `stage1`
overrides the few values that differ in LLaVA-1.5 (data, steps, lr).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokenflow_cli.config import ConfigError, EvalConfig, TrainConfig, register_recipe_kind
from tokenflow_cli.tokenizer.scales import SCALE_CHOICES

FEATURE_CHOICES = ("tokenflow", "pixel", "semantic", "teacher")
CHAT_TEMPLATES = ("auto", "plain", "qwen_2_5")  # see conversation.py


@dataclass
class TinyLMConfig:
    """A small transformers causal LM built from config (CPU runs, tests); ignored when `llm` is set."""

    architecture: str = "llama"  # "llama" or "qwen2" (any transformers config with these fields)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4  # < num_heads gives grouped-query attention
    intermediate_size: int = 384  # SwiGLU MLP width
    max_position_embeddings: int = 2048  # must cover visual tokens + text
    rope_theta: float = 10000.0
    vocab_size: int = 1024  # target size of the BPE trained on the training texts


@dataclass
class LlavaModelConfig:
    """Frozen tokenizer features -> projector -> causal LM."""

    features: str = "tokenflow"  # visual tokens: "tokenflow" | "pixel" | "semantic" | "teacher"
    tokenizer: str = ""  # TokenFlow tokenizer checkpoint (file or run folder) giving the features
    llm: str = ""  # local transformers folder (Vicuna, Qwen2.5, Llama); "" = build `tiny_llm`
    tiny_llm: TinyLMConfig = field(default_factory=TinyLMConfig)
    projector_hidden: int = 0  # hidden width of Linear-GELU-Linear; 0 = the LLM's hidden size
    image_token: str = "<image>"  # placeholder in the conversations, added as a special token
    chat_template: str = "auto"  # "auto": the LM tokenizer's template if it has one; "plain"
    # (Vicuna v1); "qwen_2_5": the official TokenFlow-LLaVA ChatML template, `<image>` first
    system_prompt: str = ""  # prepended by the plain template (and as a system turn otherwise)
    feature_grid: int = 0  # side of the visual token map: 0 = the tokenizer's final scale (27
    # for SigLIP-384: 729 tokens); another side upsamples every scale's codes to it instead
    feature_scales: str = "final"  # which scales' codes: "final" (the summed final map, h*w
    # tokens) | "all" (per scale the running sum at its own side) | "residual" (per scale its own
    # codes); all/residual give sum s_k^2 tokens, coarse to fine (understanding/features.py)
    max_length: int = 2048  # tokens per sample, visual tokens included (longer ones are cut)
    init: str = ""  # a saved understanding model to start from (stage 2 <- stage 1 output)
    llm_dtype: str = "fp32"  # LLM weights: "fp32" | "bf16" | "fp16" (projector stays fp32)
    gradient_checkpointing: bool = False  # trade compute for memory in stage 2 on big LLMs


@dataclass
class LlavaDataConfig:
    train: str = ""  # stage-2 instruction data: LLaVA JSON list or .jsonl of the same records
    pretrain: str = ""  # stage-1 caption conversations; "" = `train`
    val: str = ""  # held-out conversations for the periodic eval ("" = none)
    val_limit: int = 64  # conversations the periodic eval scores (loss and exact-match answers)
    image_root: str = ""  # folder the records' `image` paths are relative to ("" = the JSON's folder)
    num_workers: int = 0
    cache_features: bool = True  # the tokenizer is frozen: compute each image's features once


@dataclass
class Stage1Config:
    """Values that replace `train.*` in stage 1 (0 keeps the `train` value)."""

    steps: int = 0
    lr: float = 0.0  # LLaVA-1.5: 1e-3 for the projector alone (2e-5 for stage 2)
    batch_size: int = 0
    warmup_steps: int = -1  # -1 keeps train.warmup_steps


@dataclass
class LlavaEvalConfig(EvalConfig):
    data: str = ""  # question set for `eval vqa` (LLaVA JSON or the shapes world's VQA jsonl)
    max_new_tokens: int = 16


@register_recipe_kind("llava")
@dataclass
class LlavaRecipe:
    model: LlavaModelConfig = field(default_factory=LlavaModelConfig)
    data: LlavaDataConfig = field(default_factory=LlavaDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    eval: LlavaEvalConfig = field(default_factory=LlavaEvalConfig)


def stage_train_config(recipe: LlavaRecipe, stage: int) -> TrainConfig:
    """The TrainConfig of `stage` (1 or 2): stage 1 applies the `stage1` overrides."""

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if stage == 2:
        return recipe.train
    s1 = recipe.stage1
    changes = {
        "steps": s1.steps or recipe.train.steps,
        "lr": s1.lr or recipe.train.lr,
        "batch_size": s1.batch_size or recipe.train.batch_size,
        "warmup_steps": recipe.train.warmup_steps if s1.warmup_steps < 0 else s1.warmup_steps,
    }
    return dataclasses.replace(recipe.train, **changes)


def validate(recipe: LlavaRecipe) -> None:
    if recipe.model.features not in FEATURE_CHOICES:
        raise ConfigError(f"model.features: {recipe.model.features!r} is not one of {FEATURE_CHOICES}")
    if recipe.model.chat_template not in CHAT_TEMPLATES:
        raise ConfigError(f"model.chat_template: {recipe.model.chat_template!r} is not one of {CHAT_TEMPLATES}")
    if recipe.model.feature_grid < 0:
        raise ConfigError(f"model.feature_grid: {recipe.model.feature_grid}; use 0 (the tokenizer's grid) or a side")
    scales = recipe.model.feature_scales
    if scales not in SCALE_CHOICES:
        raise ConfigError(f"model.feature_scales: {scales!r} is not one of {SCALE_CHOICES}")
    if scales != "final" and recipe.model.features == "teacher":
        raise ConfigError(f"model.feature_scales: {scales!r} needs quantized features; 'teacher' has no scales")
    if scales != "final" and recipe.model.feature_grid:
        raise ConfigError(
            f"model.feature_grid: {recipe.model.feature_grid} resizes the final map only; "
            f"model.feature_scales={scales!r} keeps each scale's side (set feature_grid: 0)"
        )
