"""Visual feature sources for the understanding model: images -> (B, N, C) tokens.

The paper's ablation (Table 4) feeds the same LLaVA recipe four kinds of visual tokens:

| choice      | tokens                                                    | C (released models) |
|-------------|-----------------------------------------------------------|---------------------|
| `tokenflow` | the continuous final quantized map: the sum over scales   | 40 = d_sem + d_pix  |
|             | of each scale's upsampled code vectors, one per position  |                     |
| `semantic`  | its semantic channels only                                | 32                  |
| `pixel`     | its pixel channels only (a pixel-only VQ tokenizer's view) | 8                   |
| `teacher`   | the frozen continuous teacher features (CLIP/SigLIP)      | 512 / 1152          |

The three quantized choices are the official `final_quantize`: each scale's code map upsampled
(the tokenizer's upsampling, bicubic in the released models) to the final scale and summed
(official `vq_model.py:319-341`). `grid` > 0 upsamples every scale to that side instead (27 for
729 tokens with a tokenizer whose final scale is another size).

A source is frozen and always in eval mode; its outputs carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokenflow_cli.tokenizer.semantic import Teacher

FeatureFn = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]


def _quantized(channels: str) -> FeatureFn:
    def features(tok: nn.Module, img_B3HW: torch.Tensor, grid: int) -> torch.Tensor:
        idx_BL = tok.img_to_codes(img_B3HW).indices
        f_BChw = tok.quantizer.indices_to_features(idx_BL, grid or tok.grid)
        semantic_dim = tok.config.quantizer.semantic_dim
        f_BChw = {"all": f_BChw, "semantic": f_BChw[:, :semantic_dim], "pixel": f_BChw[:, semantic_dim:]}[channels]
        return f_BChw.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major like the codes

    return features


# name -> function(tokenizer, images, grid) -> (B, N, C); "teacher" is served by the teacher module
FEATURE_FNS: dict[str, FeatureFn] = {
    "tokenflow": _quantized("all"),
    "semantic": _quantized("semantic"),
    "pixel": _quantized("pixel"),
}


class TokenizerFeatures(nn.Module):
    """A frozen TokenFlow tokenizer (or its teacher) as a visual feature source."""

    def __init__(
        self, tokenizer: nn.Module, kind: str = "tokenflow", teacher: nn.Module | None = None, grid: int = 0
    ) -> None:
        super().__init__()
        if kind not in (*FEATURE_FNS, "teacher"):
            raise ValueError(f"unknown feature choice {kind!r}; choose one of {[*FEATURE_FNS, 'teacher']}")
        if kind == "teacher" and teacher is None:
            raise ValueError("the 'teacher' feature choice needs the frozen teacher module")
        if grid and kind == "teacher":
            raise ValueError("feature_grid applies to the quantized feature choices, not 'teacher'")
        self.kind = kind
        self.grid = grid  # 0 = the tokenizer's final scale
        self.tokenizer = tokenizer
        self.teacher = teacher if kind == "teacher" else None
        self.requires_grad_(False)
        self.eval()
        self.image_size: int = tokenizer.image_size
        num_tokens, feature_dim = self._probe()
        self.num_tokens: int = num_tokens  # N
        self.feature_dim: int = feature_dim  # C

    def train(self, mode: bool = True) -> TokenizerFeatures:
        return super().train(False)  # frozen: never dropout, never quantizer training behaviour

    def _probe(self) -> tuple[int, int]:
        """(N, C) from one blank image: exact for every choice, whatever the teacher's grid."""
        ref = next(self.tokenizer.parameters())
        blank = torch.zeros(1, 3, self.image_size, self.image_size, device=ref.device, dtype=ref.dtype)
        _, n, c = self(blank).shape
        return n, c

    @torch.no_grad()
    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) at the tokenizer's resolution -> (B, N, C) float32."""
        if self.teacher is not None:
            f_BNC = self.teacher(img_B3HW)
        else:
            f_BNC = FEATURE_FNS[self.kind](self.tokenizer, img_B3HW, self.grid)
        return f_BNC.float()


def build_feature_source(tokenizer: nn.Module, kind: str, grid: int = 0) -> TokenizerFeatures:
    """The feature source for a recipe's `model.features`; `teacher` builds the frozen teacher
    the tokenizer was trained against from its config (weights from `teacher.pretrained`)."""
    teacher = None
    if kind == "teacher":

        cfg = tokenizer.config
        teacher = Teacher(cfg.teacher, cfg.semantic_encoder).to(next(tokenizer.parameters()).device)
    return TokenizerFeatures(tokenizer, kind, teacher, grid)
