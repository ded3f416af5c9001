"""Vision-tower backends for the semantic branch, and the named tower architectures.

A `TowerBackend` says how one family of towers is built and run; backends live in a registry
(`register_tower_backend`): "open_clip" (OpenAI-layout ViT; its output projection is dropped
in the encoder, as in the official clipb model) and "hf_siglip" (transformers
`SiglipVisionModel`). Both give patch tokens of a chosen block; position tables are resized
DINO-style when the patch grid differs from the trained one. `SemanticEncoder` and `Teacher`
(semantic.py) run a tower through its backend.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_vision_tower
from open_clip.transformer import VisionTransformer
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from tokenflow_cli.tokenizer.config import SemanticEncoderConfig
from tokenflow_cli.tokenizer.semantic_decoder import resize_patch_positions
from tokenflow_cli.weights import resolve_hf_folder, resolve_open_clip_weights

__all__ = [
    "SIGLIP_PRESETS",
    "TINY_OPEN_CLIP_CONFIG",
    "TINY_OPEN_CLIP_NAME",
    "HfSiglipBackend",
    "OpenClipBackend",
    "TowerBackend",
    "blocks_to_run",
    "register_tiny_open_clip",
    "register_tower_backend",
    "siglip_preset",
    "tower_backend",
]

# --------------------------------------------------------------------------------------------
# Named architectures: the tiny open_clip tower and the SigLIP presets
# --------------------------------------------------------------------------------------------

TINY_OPEN_CLIP_NAME = "tokenflow-tiny-vit"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    # vocab stays open_clip's default so its shipped BPE tokenizer works with this text tower
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_open_clip() -> str:
    """Make `tokenflow-tiny-vit` an open_clip model name (idempotent); returns the name."""

    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        # open_clip only registers configs from JSON files; its registry keeps the entry after
        # the temporary file is gone.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{TINY_OPEN_CLIP_NAME}.json"
            path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
            open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_NAME


SIGLIP_PRESETS: dict[str, dict] = {
    "siglip-so400m-patch14-384": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=384,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
    "siglip-tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=4,
        image_size=64,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
}


def siglip_preset(name: str) -> dict:
    if name not in SIGLIP_PRESETS:
        raise ValueError(f"unknown SigLIP model {name!r}; presets: {sorted(SIGLIP_PRESETS)}")
    return dict(SIGLIP_PRESETS[name])


# --------------------------------------------------------------------------------------------
# Tower backends
# --------------------------------------------------------------------------------------------


class TowerBackend:
    """How one family of vision towers is built and run. Stateless: every method takes the
    tower module, so the module itself (and thus the state-dict layout) stays the library's.

    `tokens(tower, x, feature_layer)`: feature_layer -1 is the last block followed by the
    tower's final LayerNorm; -k (k >= 2) is the raw output of block n - k (no final norm).
    """

    def build(self, cfg: SemanticEncoderConfig, config_key: str, keep_projection: bool) -> nn.Module:
        raise NotImplementedError

    def width(self, tower: nn.Module) -> int:
        raise NotImplementedError

    def patch_size(self, tower: nn.Module) -> int:
        raise NotImplementedError

    def num_blocks(self, tower: nn.Module) -> int:
        raise NotImplementedError

    def native_grid(self, tower: nn.Module) -> int:
        raise NotImplementedError

    def tokens(self, tower: nn.Module, x_B3HW: torch.Tensor, feature_layer: int) -> torch.Tensor:
        raise NotImplementedError

    def project(self, tower: nn.Module, tokens_BND: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__}: this tower has no token projection")


_TOWER_BACKENDS: dict[str, TowerBackend] = {}


def register_tower_backend(name: str) -> Callable[[type[TowerBackend]], type[TowerBackend]]:
    def register(cls: type[TowerBackend]) -> type[TowerBackend]:
        _TOWER_BACKENDS[name] = cls()
        return cls

    return register


def tower_backend(name: str) -> TowerBackend:
    if name not in _TOWER_BACKENDS:
        raise ValueError(f"unknown semantic tower backend {name!r}; choose one of {sorted(_TOWER_BACKENDS)}")
    return _TOWER_BACKENDS[name]


def blocks_to_run(num_blocks: int, feature_layer: int) -> int:
    if not -num_blocks <= feature_layer <= -1:
        raise ValueError(f"feature_layer must be in [-{num_blocks}, -1], got {feature_layer}")
    return num_blocks + feature_layer + 1


@register_tower_backend("open_clip")
class OpenClipBackend(TowerBackend):
    """open_clip `VisionTransformer` in OpenAI naming (conv1, class_embedding, ...)."""

    def build(self, cfg: SemanticEncoderConfig, config_key: str, keep_projection: bool) -> nn.Module:
        register_tiny_open_clip()
        model_cfg = open_clip.get_model_config(cfg.model_name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {cfg.model_name!r}; see open_clip.list_models()")
        if cfg.pretrained:
            weights = resolve_open_clip_weights(cfg.model_name, cfg.pretrained, config_key)
            clip = open_clip.create_model(
                cfg.model_name, pretrained=str(weights.path), force_quick_gelu=cfg.quick_gelu or weights.quick_gelu
            )
            tower = clip.visual
        else:
            # Random init needs only the vision tower; building it directly skips the text tower
            # and respects a caller's device context (e.g. meta).

            quick_gelu = cfg.quick_gelu or model_cfg.get("quick_gelu", False)
            tower = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=quick_gelu)
        if not isinstance(tower, VisionTransformer):
            raise ValueError(f"{cfg.model_name!r} is not a ViT tower; only open_clip ViTs are supported")
        if not keep_projection:
            tower.proj = None  # the official semantic encoder has no output projection
        return tower

    def width(self, tower: nn.Module) -> int:
        return tower.conv1.out_channels

    def patch_size(self, tower: nn.Module) -> int:
        return tower.conv1.kernel_size[0]

    def num_blocks(self, tower: nn.Module) -> int:
        return len(tower.transformer.resblocks)

    def native_grid(self, tower: nn.Module) -> int:
        return math.isqrt(tower.positional_embedding.shape[0] - 1)

    def tokens(self, tower: nn.Module, x_B3HW: torch.Tensor, feature_layer: int) -> torch.Tensor:
        n_run = blocks_to_run(self.num_blocks(tower), feature_layer)
        p_BDhw = tower.conv1(x_B3HW.to(tower.conv1.weight.dtype))
        B, D, h, w = p_BDhw.shape
        x_BND = p_BDhw.flatten(2).transpose(1, 2)
        table = tower.positional_embedding  # (1 + g0*g0, D): class position first
        pos_LD = torch.cat([table[:1], resize_patch_positions(table[1:], h, w)])
        cls_B1D = tower.class_embedding.view(1, 1, D).expand(B, -1, -1)
        x_BLD = tower.ln_pre(torch.cat([cls_B1D.to(x_BND.dtype), x_BND], dim=1) + pos_LD.to(x_BND.dtype))
        batch_first = getattr(tower.transformer, "batch_first", True)
        x = x_BLD if batch_first else x_BLD.transpose(0, 1)
        for block in tower.transformer.resblocks[:n_run]:
            x = block(x)
        x_BLD = x if batch_first else x.transpose(0, 1)
        if feature_layer == -1:
            x_BLD = tower.ln_post(x_BLD)  # on every token, as the official encoder does
        return x_BLD[:, 1:]  # drop the class token

    def project(self, tower: nn.Module, tokens_BND: torch.Tensor) -> torch.Tensor:
        if tower.proj is None:
            raise ValueError("this open_clip tower was built without its projection")
        return tokens_BND @ tower.proj.to(tokens_BND.dtype)


@register_tower_backend("hf_siglip")
class HfSiglipBackend(TowerBackend):
    """transformers SigLIP vision tower (no class token), stored without a `vision_model.` level."""

    def build(self, cfg: SemanticEncoderConfig, config_key: str, keep_projection: bool) -> nn.Module:
        if cfg.pretrained:
            source = resolve_hf_folder(cfg.pretrained, config_key)
            # float(): transformers 5 keeps the checkpoint's dtype by default; towers train in fp32.
            model = SiglipVisionModel.from_pretrained(source, local_files_only=True).float()
        else:
            model = SiglipVisionModel(SiglipVisionConfig(**siglip_preset(cfg.model_name)))
        return getattr(model, "vision_model", model)  # transformers 4.x nests one level deeper

    def width(self, tower: nn.Module) -> int:
        return tower.embeddings.patch_embedding.out_channels

    def patch_size(self, tower: nn.Module) -> int:
        return tower.embeddings.patch_embedding.kernel_size[0]

    def num_blocks(self, tower: nn.Module) -> int:
        return len(tower.encoder.layers)

    def native_grid(self, tower: nn.Module) -> int:
        return math.isqrt(tower.embeddings.position_embedding.weight.shape[0])

    def tokens(self, tower: nn.Module, x_B3HW: torch.Tensor, feature_layer: int) -> torch.Tensor:
        n_run = blocks_to_run(self.num_blocks(tower), feature_layer)
        conv = tower.embeddings.patch_embedding
        p_BDhw = conv(x_B3HW.to(conv.weight.dtype))  # stride = patch: covers floor(size / patch)
        _, _, h, w = p_BDhw.shape
        x_BND = p_BDhw.flatten(2).transpose(1, 2)
        pos_ND = resize_patch_positions(tower.embeddings.position_embedding.weight, h, w)
        x_BND = x_BND + pos_ND.to(x_BND.dtype)
        # Running the layers here (instead of output_hidden_states) skips the blocks after the
        # feature layer; the skipped ones do not affect the features.
        for layer in tower.encoder.layers[:n_run]:
            out = layer(x_BND, None)
            x_BND = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        if feature_layer == -1:
            x_BND = tower.post_layernorm(x_BND)
        return x_BND
