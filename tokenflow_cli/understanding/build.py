"""Building and locating understanding models: a fresh one from a recipe (tiny LM from config,
a local LLM, or a saved model to continue from) and a saved one from any folder a user may
point at.

A finetune run folder holds:

    RUN_DIR/llava-base/          LM config, text tokenizer, llava.json (no weights)
    RUN_DIR/model.safetensors    latest full state (the training loop's checkpoint format)
    RUN_DIR/checkpoints/step-N/  complete checkpoints (weights + train_state.pt)
    RUN_DIR/final/               the finished model in transformers' format (save_pretrained)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tokenflow_cli.checkpoint import WEIGHTS_NAME
from tokenflow_cli.data.text_tokenizer import add_special_tokens, train_bpe_tokenizer
from tokenflow_cli.device import dtype_of
from tokenflow_cli.understanding.config import LlavaModelConfig
from tokenflow_cli.understanding.model import LLAVA_JSON, PROJECTOR_NAME, LlavaModel

SKELETON_DIR = "llava-base"
FINAL_DIR = "final"


def locate_llava(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, full-state weights or None) for a saved model folder, a finetune run
    folder (its newer of `final/` and the latest checkpoint) or one checkpoint folder."""
    path = Path(path)
    if (path / LLAVA_JSON).is_file() and (path / PROJECTOR_NAME).is_file():
        return path, None
    for run_dir in (path, path.parent.parent):  # a run folder, or RUN_DIR/checkpoints/step-N
        skeleton = run_dir / SKELETON_DIR
        if not (skeleton / LLAVA_JSON).is_file():
            continue
        weights = path / WEIGHTS_NAME
        final = run_dir / FINAL_DIR
        if run_dir == path and (final / PROJECTOR_NAME).is_file():
            if not weights.is_file() or final.stat().st_mtime >= weights.stat().st_mtime:
                return final, None
        if weights.is_file():
            return skeleton, weights
    raise FileNotFoundError(
        f"no understanding model at {path}: expected a folder with {LLAVA_JSON} and {PROJECTOR_NAME}, "
        f"or a `tokenflow finetune-llava` run folder"
    )


def load_llava(path: str | Path, dtype: torch.dtype | None = None) -> LlavaModel:
    model_dir, weights = locate_llava(path)
    return LlavaModel.from_pretrained(model_dir, dtype=dtype, weights=weights)


def build_llava(
    config: LlavaModelConfig,
    feature_dim: int,
    num_visual_tokens: int,
    texts: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
) -> LlavaModel:
    """A fresh model (or `config.init`'s) for the given feature source size.

    The LLM comes from `config.init` (a saved understanding model, e.g. the stage-1 output),
    else the local folder `config.llm`, else a tiny config, whose BPE tokenizer is trained on
    `texts` (the training conversations)."""
    if config.init:
        model = load_llava(config.init, dtype=dtype_of(config.llm_dtype))
        was, now = model.config, config
        if (model.feature_dim, model.num_visual_tokens, was.feature_scales) != (
            feature_dim, num_visual_tokens, now.feature_scales
        ):
            raise ValueError(
                f"{config.init} was trained on {model.num_visual_tokens} x {model.feature_dim} visual "
                f"tokens ({was.features}, feature_scales={was.feature_scales}); this recipe gives "
                f"{num_visual_tokens} x {feature_dim} ({now.features}, feature_scales={now.feature_scales})"
            )
        model.config = config
        model.extra.update(extra or {})
        return model
    if config.llm:
        lm, text_tokenizer = load_local_lm(config.llm, dtype_of(config.llm_dtype))
    else:
        lm, text_tokenizer = build_tiny_lm(config, texts)

    add_special_tokens(text_tokenizer, [config.image_token])
    if len(text_tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(text_tokenizer))
    return LlavaModel(lm, text_tokenizer, config, feature_dim, num_visual_tokens, extra)


def load_local_lm(path: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A transformers causal LM and its tokenizer from a local folder (never downloads)."""

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.llm: no folder {path!r}. Put a transformers causal LM there (config.json, *.safetensors "
            "and tokenizer files, e.g. from `huggingface-cli download lmsys/vicuna-13b-v1.5 --local-dir ...`)"
        )
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    text_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if text_tokenizer.pad_token is None:  # Llama/Vicuna ship none; LLaVA pads with unk
        text_tokenizer.pad_token = text_tokenizer.unk_token or text_tokenizer.eos_token
    return lm, text_tokenizer


def build_tiny_lm(config: LlavaModelConfig, texts: Iterable[str]) -> tuple[nn.Module, Any]:
    """A small causal LM from `config.tiny_llm` and a BPE trained on `texts`."""

    texts = list(texts)
    if not texts:
        raise ValueError("a tiny LLM needs training texts for its tokenizer (or set model.llm to a local LLM)")
    t = config.tiny_llm
    text_tokenizer = train_bpe_tokenizer(
        texts, t.vocab_size, [config.image_token], model_max_length=t.max_position_embeddings
    )
    lm_config = AutoConfig.for_model(
        t.architecture,
        vocab_size=len(text_tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(lm_config), text_tokenizer
