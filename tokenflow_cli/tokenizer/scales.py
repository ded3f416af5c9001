"""The next-scale token layout: one flat index row holds every scale's s x s map, row-major,
coarse to fine. This type owns the arithmetic (sizes, offsets, slices, prefixes) so no other
module re-derives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only in annotations: reading a codes file stays torch-free
    import torch

# which scales' codes make continuous features (TokenFlowTokenizer.features, understanding's
# model.feature_scales): the summed final map, per-scale running sums, per-scale codes alone
SCALE_CHOICES = ("final", "all", "residual")


@dataclass(frozen=True)
class ScaleLayout:
    scales: tuple[int, ...]  # side s_k of each token map, coarse to fine
    offsets: tuple[int, ...] = field(init=False)  # start of scale k in a flat row; offsets[-1] = L

    def __post_init__(self) -> None:
        scales = tuple(int(s) for s in self.scales)
        if not scales or min(scales) < 1:
            raise ValueError(f"scales must be positive sides, got {self.scales}")
        starts = np.concatenate([[0], np.cumsum([s * s for s in scales])])
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "offsets", tuple(int(x) for x in starts))

    def __len__(self) -> int:
        return len(self.scales)

    @property
    def num_tokens(self) -> int:
        """L = sum of s_k^2."""
        return self.offsets[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s * s for s in self.scales)

    def span(self, k: int) -> slice:
        """Positions of scale k in a flat row."""
        return slice(self.offsets[k], self.offsets[k + 1])

    def prefix_length(self, length: int) -> int:
        """How many scales a row of `length` indices fills exactly (a decode may stop early)."""
        if length not in self.offsets:
            raise ValueError(f"{length} indices do not fill a prefix of scales {self.scales}")
        return self.offsets.index(length)

    def split(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """(B, L') with L' a prefix length -> [(B, s_k^2)] for the scales it fills."""
        n = self.prefix_length(idx_BL.shape[1])
        return list(idx_BL.split(self.sizes[:n], dim=1))

    def maps(self, idx_BL: torch.Tensor | np.ndarray) -> list:
        """(B, L) -> [(B, s_k, s_k)] views, torch or numpy alike."""
        self.check_width(idx_BL.shape[1])
        return [idx_BL[:, self.span(k)].reshape(-1, s, s) for k, s in enumerate(self.scales)]

    def check_width(self, width: int, what: str = "indices") -> None:
        if width != self.num_tokens:
            raise ValueError(f"{what}: {width} per row, scales {self.scales} need L={self.num_tokens}")
