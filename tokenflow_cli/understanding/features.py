"""Visual feature sources for the understanding model: images -> (B, N, C) tokens.

The paper's ablation (Table 4) feeds the same LLaVA recipe four kinds of visual tokens:

| choice      | tokens                                                    | C (released models) |
|-------------|-----------------------------------------------------------|---------------------|
| `tokenflow` | the continuous quantized code vectors (see `scales`)      | 40 = d_sem + d_pix  |
| `semantic`  | their semantic channels only                              | 32                  |
| `pixel`     | their pixel channels only (a pixel-only VQ tokenizer's view) | 8                |
| `teacher`   | the frozen continuous teacher features (CLIP/SigLIP)      | 512 / 1152          |

The three quantized choices take one of three `scales` (recipe `model.feature_scales`; scales
s_1 < ... < s_K, final grid h x w, f_k = scale k's code map upsampled to h x w):

| scales     | tokens, concatenated along the sequence coarse to fine        | N (toy: 1..8) |
|------------|---------------------------------------------------------------|---------------|
| `final`    | the final quantized map sum_k f_k, one token per position    | h*w (64)      |
| `all`      | per scale k the running sum f_1 + ... + f_k area-downsampled | sum s_k^2 (130) |
|            | to s_k x s_k (the last block is `final` when s_K = h)         |               |
| `residual` | per scale k its own code vectors at s_k x s_k (no running sum) | sum s_k^2 (130) |

`final` is the official `final_quantize`: each scale's code map upsampled (the tokenizer's
upsampling, bicubic in the released models) to the final scale and summed (official
`vq_model.py:319-341`). `grid` > 0 upsamples every scale to that side instead (27 for 729
tokens with a tokenizer whose final scale is another size); it applies to `final` only.
The per-scale maps come from `MultiScaleDualQuantizer.indices_to_scale_maps`, the same code
behind `TokenFlowTokenizer.features(codes, scales=...)`.

A source is frozen and always in eval mode; its outputs carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokenflow_cli.tokenizer.scales import SCALE_CHOICES
from tokenflow_cli.tokenizer.semantic import Teacher

FeatureFn = Callable[[nn.Module, torch.Tensor, int, str], torch.Tensor]


def _quantized(channels: str) -> FeatureFn:
    def features(tok: nn.Module, img_B3HW: torch.Tensor, grid: int, scales: str) -> torch.Tensor:
        idx_BL = tok.img_to_codes(img_B3HW).indices
        if scales == "final":
            f_BNC = tok.quantizer.indices_to_features(idx_BL, grid or tok.grid).flatten(2).transpose(1, 2)
        else:  # one block per scale, each row-major like the codes
            maps = tok.quantizer.indices_to_scale_maps(idx_BL, tok.grid, running_sum=scales == "all")
            f_BNC = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        semantic_dim = tok.config.quantizer.semantic_dim
        return {"all": f_BNC, "semantic": f_BNC[..., :semantic_dim], "pixel": f_BNC[..., semantic_dim:]}[channels]

    return features


# name -> function(tokenizer, images, grid, scales) -> (B, N, C); "teacher" is served by the teacher module
FEATURE_FNS: dict[str, FeatureFn] = {
    "tokenflow": _quantized("all"),
    "semantic": _quantized("semantic"),
    "pixel": _quantized("pixel"),
}


class TokenizerFeatures(nn.Module):
    """A frozen TokenFlow tokenizer (or its teacher) as a visual feature source."""

    def __init__(
        self,
        tokenizer: nn.Module,
        kind: str = "tokenflow",
        teacher: nn.Module | None = None,
        grid: int = 0,
        scales: str = "final",
    ) -> None:
        super().__init__()
        if kind not in (*FEATURE_FNS, "teacher"):
            raise ValueError(f"unknown feature choice {kind!r}; choose one of {[*FEATURE_FNS, 'teacher']}")
        if kind == "teacher" and teacher is None:
            raise ValueError("the 'teacher' feature choice needs the frozen teacher module")
        if grid and kind == "teacher":
            raise ValueError("feature_grid applies to the quantized feature choices, not 'teacher'")
        if scales not in SCALE_CHOICES:
            raise ValueError(f"unknown feature scales {scales!r}; choose one of {SCALE_CHOICES}")
        if scales != "final" and kind == "teacher":
            raise ValueError(f"feature_scales={scales!r} applies to the quantized feature choices, not 'teacher'")
        if scales != "final" and grid:
            raise ValueError(f"feature_grid resizes the final map; feature_scales={scales!r} keeps each scale's side")
        self.kind = kind
        self.grid = grid  # 0 = the tokenizer's final scale
        self.scales = scales  # "final" | "all" | "residual" (module docstring)
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
            f_BNC = FEATURE_FNS[self.kind](self.tokenizer, img_B3HW, self.grid, self.scales)
        return f_BNC.float()


def build_feature_source(tokenizer: nn.Module, kind: str, grid: int = 0, scales: str = "final") -> TokenizerFeatures:
    """The feature source for a recipe's `model.features`; `teacher` builds the frozen teacher
    the tokenizer was trained against from its config (weights from `teacher.pretrained`);
    `scales` is `model.feature_scales`."""
    teacher = None
    if kind == "teacher":

        cfg = tokenizer.config
        teacher = Teacher(cfg.teacher, cfg.semantic_encoder).to(next(tokenizer.parameters()).device)
    return TokenizerFeatures(tokenizer, kind, teacher, grid, scales)
