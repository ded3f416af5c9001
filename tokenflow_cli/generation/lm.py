"""The generator's decoder-only LM backbone (no LM head), built from transformers.

From a local pretrained folder (`model.lm_path`), from a saved transformers config (when
loading our checkpoints), or from scratch by `model.lm_arch` (a registry, `LM_ARCHS`) and the
size fields. generation/model.py puts the image parts and the block-causal sequence around it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn
from transformers import AutoConfig, AutoModel, Exaone4Config, Exaone4Model, LlamaConfig, LlamaModel

from tokenflow_cli.device import dtype_of
from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.tokenizer.scales import ScaleLayout

__all__ = ["LM_ARCHS", "build_lm"]


def _rope_kwargs(config_cls: type, theta: float) -> dict:
    """transformers 5 takes `rope_parameters`, 4.x `rope_theta`."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def _sizes(cfg: GeneratorModelConfig, config_cls: type) -> dict:
    """The size and init fields every architecture shares, from the generator's config."""
    return dict(
        vocab_size=cfg.text_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        **_rope_kwargs(config_cls, cfg.rope_theta),
        max_position_embeddings=cfg.max_text_tokens + 2 * ScaleLayout(tuple(cfg.scales)).num_tokens,
        initializer_range=cfg.init_std,
        attn_implementation=cfg.attn_implementation,
    )


def _llama(cfg: GeneratorModelConfig) -> nn.Module:
    """Stock Llama: pre-norm blocks, no QK-norm."""
    return LlamaModel(LlamaConfig(**_sizes(cfg, LlamaConfig)))


def _llama_qknorm_postnorm(cfg: GeneratorModelConfig) -> nn.Module:
    """The official TokenFlow-t2i block (official/T2I.md "Model"): Llama with an RMSNorm over
    head_dim on q and on k before RoPE (one weight shared by the heads) and the norm after
    each branch, `h = x + norm(attn(x))`, `h = h + norm(mlp(h))`, final norm kept. transformers'
    EXAONE-4 block is exactly this when every layer is global attention with RoPE."""
    lm_config = Exaone4Config(**_sizes(cfg, Exaone4Config), sliding_window=None,
                              layer_types=["full_attention"] * cfg.num_layers)
    return Exaone4Model(lm_config)


def _set_qk_norm_eps(lm: nn.Module, eps: float) -> None:
    """The QK-norm's own epsilon (1e-6 officially, the block norms use rms_norm_eps): the
    transformers config has one epsilon for both, so it is set on the modules."""
    for name, module in lm.named_modules():
        if name.endswith(("self_attn.q_norm", "self_attn.k_norm")):
            module.variance_epsilon = eps


LM_ARCHS: dict[str, Callable[[GeneratorModelConfig], nn.Module]] = {
    "llama": _llama,
    "llama-qknorm-postnorm": _llama_qknorm_postnorm,
}


def build_lm(cfg: GeneratorModelConfig, lm_config: dict | None = None) -> nn.Module:
    """The decoder-only backbone (no LM head): from a local pretrained folder, from a saved
    transformers config (`lm_config`, rebuilt without weights when loading our checkpoints),
    or from `cfg.lm_arch` and the size fields."""

    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"model.attn_implementation {cfg.attn_implementation!r}: the block-causal mask "
                         "needs 'sdpa' or 'eager'")
    lm = _build(cfg, lm_config)
    _set_qk_norm_eps(lm, cfg.qk_norm_eps)
    return lm


def _build(cfg: GeneratorModelConfig, lm_config: dict | None) -> nn.Module:
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
