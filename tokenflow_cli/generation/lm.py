"""The generator's decoder-only LM backbone (no LM head), built from transformers.

From a local pretrained folder (`model.lm_path`), from a saved transformers config (when
loading our checkpoints), or from scratch by `model.lm_arch` (a registry, `LM_ARCHS`) and the
size fields. generation/model.py puts the image parts and the block-causal sequence around it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel

from tokenflow_cli.device import dtype_of
from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.tokenizer.scales import ScaleLayout

__all__ = ["LM_ARCHS", "build_lm"]



def _rope_kwargs(config_cls: type, theta: float) -> dict:
    """transformers 5 takes `rope_parameters`, 4.x `rope_theta`."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def _llama(cfg: GeneratorModelConfig) -> nn.Module:
    lm_config = LlamaConfig(
        vocab_size=cfg.text_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        **_rope_kwargs(LlamaConfig, cfg.rope_theta),
        max_position_embeddings=cfg.max_text_tokens + 2 * ScaleLayout(tuple(cfg.scales)).num_tokens,
        initializer_range=cfg.init_std,
        attn_implementation=cfg.attn_implementation,
    )
    return LlamaModel(lm_config)


LM_ARCHS: dict[str, Callable[[GeneratorModelConfig], nn.Module]] = {"llama": _llama}


def build_lm(cfg: GeneratorModelConfig, lm_config: dict | None = None) -> nn.Module:
    """The decoder-only backbone (no LM head): from a local pretrained folder, from a saved
    transformers config (`lm_config`, rebuilt without weights when loading our checkpoints),
    or from `cfg.lm_arch` and the size fields."""

    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"model.attn_implementation {cfg.attn_implementation!r}: the block-causal mask "
                         "needs 'sdpa' or 'eager'")
    if lm_config is not None:
        config = AutoConfig.for_model(**lm_config)
        config._attn_implementation = cfg.attn_implementation
        return AutoModel.from_config(config)
    if cfg.lm_path:
        try:
            return AutoModel.from_pretrained(
                cfg.lm_path, local_files_only=True, dtype=dtype_of(cfg.lm_dtype),
                attn_implementation=cfg.attn_implementation,
            )
        except OSError as err:
            raise FileNotFoundError(
                f"pretrained LM not found at {cfg.lm_path!r} (model.lm_path): give a local Hugging Face "
                f"folder with config.json and weights (nothing is downloaded): {err}"
            ) from None
    if cfg.lm_arch not in LM_ARCHS:
        raise ValueError(f"unknown model.lm_arch {cfg.lm_arch!r}; choose one of {sorted(LM_ARCHS)}")
    return LM_ARCHS[cfg.lm_arch](cfg)
