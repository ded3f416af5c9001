"""Semantic branch: the CLIP/SigLIP tower (`SemanticEncoder`) and the frozen `Teacher`.

Towers are built and run by a backend from the registry in semantic_towers.py ("open_clip",
"hf_siglip"); the semantic decoder lives in semantic_decoder.py. Both are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from tokenflow_cli.tokenizer.config import SemanticEncoderConfig, TeacherConfig
from tokenflow_cli.tokenizer.semantic_towers import (
    blocks_to_run,
    tower_backend,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "INPUT_NORMS",
    "SemanticEncoder",
    "Teacher",
    "input_norm",
    "load_teacher_state_into_encoder",
]

# --------------------------------------------------------------------------------------------
# Input normalisation of the [-1, 1] image (a table, one entry per `input_norm` name)
# --------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _identity(img_B3HW: torch.Tensor) -> torch.Tensor:
    return img_B3HW  # official clipb quirk: the [-1, 1] image goes into CLIP unchanged


def _clip_mean_std(img_B3HW: torch.Tensor) -> torch.Tensor:
    mean = img_B3HW.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = img_B3HW.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((img_B3HW + 1) / 2 - mean) / std


def _siglip_scaling(img_B3HW: torch.Tensor) -> torch.Tensor:
    # Official siglip `scaling_layer`: to [0, 1], clamp, then (x - 0.5) / 0.5; a clamp to [-1, 1].
    return (((img_B3HW + 1) / 2).clamp(0, 1) - 0.5) / 0.5


INPUT_NORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": _identity,
    "clip_mean_std": _clip_mean_std,
    "clamp": _siglip_scaling,
}


def input_norm(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {name!r}; choose one of {sorted(INPUT_NORMS)}")
    return INPUT_NORMS[name]


# --------------------------------------------------------------------------------------------
# Semantic encoder and teacher
# --------------------------------------------------------------------------------------------


class SemanticEncoder(nn.Module):
    """[-1, 1] image (B, 3, H, W) -> patch-token grid f_BDhw (B, D, H // patch, W // patch)."""

    def __init__(
        self,
        cfg: SemanticEncoderConfig,
        image_size: int,
        *,
        config_key: str = "model.semantic_encoder",
        keep_projection: bool = False,
        weights_from_checkpoint: bool = False,
    ):
        """`weights_from_checkpoint`: the tower's weights will be loaded from a checkpoint, so it
        is built without its pretrained source (no teacher file needed, nothing downloads)."""
        super().__init__()
        self.config = cfg
        self.image_size = image_size
        self.backend = tower_backend(cfg.backend)
        self.normalize = input_norm(cfg.input_norm)
        build_cfg = dataclasses.replace(cfg, pretrained="") if weights_from_checkpoint else cfg
        self.tower = self.backend.build(build_cfg, config_key, keep_projection)
        self.random_init = not (cfg.pretrained or weights_from_checkpoint)  # callers say so in their output
        self.width = self.backend.width(self.tower)
        self.patch_size = self.backend.patch_size(self.tower)
        self.native_grid = self.backend.native_grid(self.tower)
        blocks_to_run(self.backend.num_blocks(self.tower), cfg.feature_layer)  # validate early
        if cfg.native_size // self.patch_size != self.native_grid:
            raise ValueError(
                f"{config_key}.native_size={cfg.native_size} gives a {cfg.native_size // self.patch_size} "
                f"grid, but the {cfg.model_name!r} tower's position table is {self.native_grid}x{self.native_grid}"
            )
        if not cfg.trainable:
            self.tower.requires_grad_(False)

    def grid_size(self, image_size: int) -> int:
        return image_size // self.patch_size

    def tokens(self, img_B3HW: torch.Tensor, feature_layer: int | None = None) -> torch.Tensor:
        """(B, N, D) patch tokens of `feature_layer` (default: the config's)."""
        layer = self.config.feature_layer if feature_layer is None else feature_layer
        return self.backend.tokens(self.tower, self.normalize(img_B3HW), layer)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        B, _, H, W = img_B3HW.shape
        tokens_BND = self.tokens(img_B3HW)
        h, w = H // self.patch_size, W // self.patch_size
        return tokens_BND.transpose(1, 2).reshape(B, self.width, h, w)


def _proj_tokens(encoder: SemanticEncoder, img_B3HW: torch.Tensor) -> torch.Tensor:
    # CLIP patch tokens after ln_post and the CLIP projection (T = embed dim).
    return encoder.backend.project(encoder.tower, encoder.tokens(img_B3HW, feature_layer=-1))


def _penultimate(encoder: SemanticEncoder, img_B3HW: torch.Tensor) -> torch.Tensor:
    return encoder.tokens(img_B3HW, feature_layer=-2)  # SigLIP's second-to-last hidden state


TEACHER_FEATURES: dict[str, Callable[[SemanticEncoder, torch.Tensor], torch.Tensor]] = {
    "proj_tokens": _proj_tokens,
    "penultimate": _penultimate,
}


class Teacher(nn.Module):
    """Frozen tower whose tokens (B, N, T) the semantic decoder regresses.

    Kept outside the tokenizer's parameters by its owner (the official model keeps it in the
    loss), so it never enters a checkpoint. Always in eval mode and without gradients.
    """

    def __init__(self, cfg: TeacherConfig, semantic_cfg: SemanticEncoderConfig):
        super().__init__()
        if cfg.feature not in TEACHER_FEATURES:
            raise ValueError(f"unknown teacher feature {cfg.feature!r}; choose one of {sorted(TEACHER_FEATURES)}")
        self.config = cfg
        self.feature = TEACHER_FEATURES[cfg.feature]
        tower_cfg = dataclasses.replace(
            semantic_cfg,
            backend=cfg.backend,
            model_name=cfg.model_name,
            pretrained=cfg.pretrained or semantic_cfg.pretrained,  # "" = the encoder's source
            input_norm=cfg.input_norm,
            feature_layer=-1,
            trainable=False,
        )
        self.encoder = SemanticEncoder(
            tower_cfg, tower_cfg.native_size, config_key="model.teacher", keep_projection=cfg.feature == "proj_tokens"
        )
        self.random_init = self.encoder.random_init
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.encoder.patch_size, self.encoder.patch_size)
            self.dim = self.feature(self.encoder, probe.to(self._param_device())).shape[-1]
        if self.dim != cfg.dim:
            raise ValueError(f"model.teacher.dim={cfg.dim} but the {cfg.model_name!r} teacher gives {self.dim}")

    @property
    def tower(self) -> nn.Module:
        return self.encoder.tower

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: stays in eval mode whatever the owner does

    @torch.no_grad()
    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.feature(self.encoder, img_B3HW)


@torch.no_grad()
def load_teacher_state_into_encoder(encoder: SemanticEncoder, teacher: Teacher) -> list[str]:
    """Initialise the semantic tower from the teacher: copy every tower entry whose name and
    shape match (the teacher's projection has no counterpart). Returns the copied keys."""
    source = teacher.tower.state_dict()
    copied = []
    for key, target in encoder.tower.state_dict().items():
        if key in source and source[key].shape == target.shape:
            target.copy_(source[key])
            copied.append(key)
    if len(copied) == len(encoder.tower.state_dict()):
        encoder.random_init = teacher.random_init
    return copied
