"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`) and hinge GAN losses.

The layer stack is taming's: 4x4 convs, stride 2 for the first `layers` convs and stride 1 for
the last two, width doubling up to 8x, LeakyReLU(0.2), one logit per overlapping patch.
Normalisation defaults to GroupNorm instead of taming's BatchNorm: GroupNorm has no running
statistics, so it behaves the same in train and eval mode and needs no SyncBatchNorm under DDP
(batch statistics would otherwise differ per rank and be computed separately for real and fake
batches). `norm="none"` drops normalisation entirely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    # Up to 32 groups, but always a divisor of the width so any `channels` works.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) image -> (B, 1, h, w) real/fake logits, one per patch.

    With the default 3 layers a 256 input gives 30x30 logits (receptive field 70 px).
    """

    def __init__(
        self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "group"
    ) -> None:
        super().__init__()
        if norm not in ("group", "none"):
            raise ValueError(f"PatchDiscriminator norm must be 'group' or 'none', got {norm!r}")
        if layers < 1:
            raise ValueError(f"PatchDiscriminator needs layers >= 1, got {layers}")
        self.norm = norm

        stack: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last hidden conv keeps the resolution
            stack += self._conv_norm_act(width, out, stride)
            width = out
        stack.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        # `main.N` as in taming, so norm-free weights line up with its key names.
        self.main = nn.Sequential(*stack)
        self.reset_parameters()

    def _conv_norm_act(self, in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
        if self.norm == "group":
            # The norm's affine shift makes a conv bias redundant.
            return [
                nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1, bias=False),
                _group_norm(out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        return [
            nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]

    def reset_parameters(self) -> None:
        """DCGAN init used by pix2pix/taming: conv N(0, 0.02); norm scale N(1, 0.02), shift 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.main(img_BCHW)  # (B, 1, h, w) logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E[D(G(z))]."""
    return -logits_fake.mean()
