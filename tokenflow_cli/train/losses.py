"""Tokenizer losses (DESIGN.md section 2): LPIPS from a local backbone, hinge GAN with a start
step and VQGAN's adaptive weight, and the semantic cosine loss against the frozen teacher.

L2, VQ and commitment come straight from `TokenizerOutput`; the weighting lives in
`tokenizer_step.py`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow_cli import weights
from tokenflow_cli.config import LossConfig

# train.loss.lpips_net -> the weights.py registry entry of the ImageNet backbone LPIPS is
# calibrated on (its file name, environment variable and lookup order live there)
LPIPS_BACKBONES = {"vgg": "lpips-vgg", "alex": "lpips-alex"}


class MissingLpipsBackboneError(FileNotFoundError):
    """The LPIPS backbone weights are nowhere `weights.find_weight_file` looks."""


def lpips_backbone_path(net: str) -> Path:
    """The backbone file LPIPS loads: the first that exists in `weights.weight_candidates` order
    ($TOKENFLOW_LPIPS_VGG / _ALEX, $TORCH_HOME/hub/checkpoints, $TOKENFLOW_HOME/weights, ...),
    else its default location (torchvision's cache), where a copy should go."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"train.loss.lpips_net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    key = LPIPS_BACKBONES[net]
    return weights.find_weight_file(key) or weights.default_location(weights.WEIGHT_FILES[key])


@dataclass
class Perceptual:
    """An LPIPS module and what it is: `label` goes into logs so a random backbone is never
    mistaken for the real metric."""

    module: nn.Module
    label: str  # "lpips-vgg" or "lpips-vgg (RANDOM backbone: not the LPIPS metric)"
    random_backbone: bool

    def __call__(self, a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) of two [-1, 1] batches."""
        return self.module(a_B3HW.float(), b_B3HW.float()).flatten()


def build_lpips(net: str = "vgg", allow_random_backbone: bool = False) -> Perceptual:
    """LPIPS with its ImageNet backbone read from a local file (`lpips_backbone_path`), never
    downloaded.

    The lpips package ships only its calibrated linear heads; the backbone is torchvision's.
    We build lpips with a random trunk (no network access) and copy the cached weights in.
    A missing file is an error naming it, unless `allow_random_backbone` (tests) is set.
    """
    import lpips

    path = lpips_backbone_path(net)
    with warnings.catch_warnings():  # torchvision deprecation noise from lpips' own constructor
        warnings.simplefilter("ignore")
        module = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if path.is_file():
        _load_backbone(module.net, torch.load(path, map_location="cpu", weights_only=True))
        label, random_backbone = f"lpips-{net}", False
    elif allow_random_backbone:
        label, random_backbone = f"lpips-{net} (RANDOM backbone: not the LPIPS metric)", True
    else:
        spec = weights.WEIGHT_FILES[LPIPS_BACKBONES[net]]
        looked = ", ".join(str(p) for p in weights.weight_candidates(spec.key))
        raise MissingLpipsBackboneError(
            f"LPIPS needs the {spec.title}, {spec.filename}; downloads are off and no copy was found "
            f"(looked at {looked}). {spec.how[0].upper()}{spec.how[1:]}: put it at {path} or point "
            f"{spec.env} at it; or set train.loss.lpips_weight=0. train.loss.lpips_random_backbone=true "
            "allows a random backbone, for tests only"
        )
    module.requires_grad_(False)
    return Perceptual(module.eval(), label, random_backbone)


def _load_backbone(trunk: nn.Module, features_state: dict[str, torch.Tensor]) -> None:
    """lpips splits torchvision's `features.N` layers into `sliceK.N`: map the names back."""
    own = trunk.state_dict()
    for name in own:
        _, index, leaf = name.split(".")
        source = f"features.{index}.{leaf}"
        if source not in features_state or features_state[source].shape != own[name].shape:
            raise ValueError(f"LPIPS backbone file lacks {source} with shape {tuple(own[name].shape)}")
        own[name] = features_state[source]
    trunk.load_state_dict(own)


# --------------------------------------------------------------------------------------------
# GAN
# --------------------------------------------------------------------------------------------


def gan_active(step: int, cfg: LossConfig) -> bool:
    """The discriminator and the generator's GAN term run from `gan_start_step` on."""
    return cfg.gan_weight > 0 and step >= cfg.gan_start_step


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters without gradients for the duration: the generator's GAN term flows back into
    the image but never into the discriminator (whose own loss trains it)."""
    previous = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), previous):
            p.requires_grad_(flag)


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN (Esser et al. 2021, eq. 7): lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4) at the
    decoder's last layer L, so the GAN term neither dwarfs nor vanishes against reconstruction."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------
# Semantic
# --------------------------------------------------------------------------------------------


def semantic_cosine_loss(pred_BNT: torch.Tensor, target_BNT: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, teacher) (BEiT-v2 / official TokenFlow)."""
    if pred_BNT.shape != target_BNT.shape:
        raise ValueError(
            f"semantic prediction {tuple(pred_BNT.shape)} and teacher tokens {tuple(target_BNT.shape)} "
            "differ: the teacher grid must match the last scale and model.teacher.dim the teacher width"
        )
    return (1.0 - F.cosine_similarity(pred_BNT.float(), target_BNT.float(), dim=-1)).mean()
