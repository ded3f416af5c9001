"""Codebook usage and perplexity, per scale and overall, for three views of the same tokens.

- shared: the index the tokenizer emits (joint semantic + pixel distance, tokenizer/quantizer.py);
- semantic: on the same residual, the code nearest in the semantic half alone;
- pixel: on the same residual, the code nearest in the pixel half alone.

The residual pyramid always follows the shared index (that is what tokenization does); the two
halves only say which code each distance alone would have picked at each step. Where they differ
from the shared index the codebook is a compromise between the two spaces.

Usage = share of the K codes hit at least once; perplexity = exp(entropy of code frequencies)
(K when every code is equally frequent, 1 when one code takes every token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenflow_cli.eval.visual import usage_histogram
from tokenflow_cli.tokenizer.codes import check_index_range
from tokenflow_cli.tokenizer.quantizer import MultiScaleDualQuantizer, nearest_code
from tokenflow_cli.tokenizer.scales import ScaleLayout
from tokenflow_cli.tokenizer.usage import perplexity

VIEWS = ("shared", "semantic", "pixel")


def count_codes(idx_BL: torch.Tensor | np.ndarray, scales: tuple[int, ...], codebook_size: int) -> np.ndarray:
    """(S, K) int64: how often each code occurs at each scale in a batch of flat indices."""
    idx = torch.as_tensor(np.asarray(idx_BL) if not isinstance(idx_BL, torch.Tensor) else idx_BL).long().cpu()
    layout = ScaleLayout(tuple(scales))
    layout.check_width(idx.shape[1])
    out = np.zeros((len(scales), codebook_size), dtype=np.int64)
    check_index_range(idx.numpy(), layout, codebook_size, "indices")  # the codes files' own check
    for si in range(len(layout)):
        out[si] = torch.bincount(idx[:, layout.span(si)].reshape(-1), minlength=codebook_size).numpy()
    return out


@dataclass
class UsageCounts:
    """Running (S, K) counts for each view."""

    scales: tuple[int, ...]
    codebook_size: int
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    images: int = 0

    def add(self, view: str, idx_BL: torch.Tensor) -> None:
        new = count_codes(idx_BL, self.scales, self.codebook_size)
        self.counts[view] = self.counts[view] + new if view in self.counts else new

    def summary(self) -> dict:
        """{view: {"overall": {...}, "per_scale": [{scale, tokens, usage, used, perplexity}]}}."""
        out = {}
        for view, counts in self.counts.items():
            per_scale = [
                {"scale": s, "tokens": int(c.sum()), "used": int((c > 0).sum()), "usage": float((c > 0).mean()),
                 "perplexity": perplexity(c)}
                for s, c in zip(self.scales, counts)
            ]
            total = counts.sum(0)
            overall = {"tokens": int(total.sum()), "used": int((total > 0).sum()), "usage": float((total > 0).mean()),
                       "perplexity": perplexity(total)}
            out[view] = {"overall": overall, "per_scale": per_scale}
        return out


def _norm(q: MultiScaleDualQuantizer, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1) if q.cfg.l2_normalize else x


@torch.no_grad()
def nearest_by_half(q: MultiScaleDualQuantizer, r_BCss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual map at one scale -> (B, s*s) indices of the nearest code by the semantic half's
    distance alone and by the pixel half's alone (the shared index is `q.search`)."""
    B, _, s, _ = r_BCss.shape
    z = r_BCss.permute(0, 2, 3, 1).reshape(B * s * s, -1)
    d_sem = q.cfg.semantic_dim
    z_sem, z_pix = _norm(q, z[:, :d_sem]), _norm(q, z[:, d_sem:])
    sem_cb, pix_cb = (c.detach() for c in q.codebooks())
    chunk = q.cfg.search_chunk_size
    sem_only = nearest_code(z_sem, z_pix, sem_cb, pix_cb, pixel_weight=0.0, semantic_weight=1.0, chunk_size=chunk)
    pix_only = nearest_code(z_sem, z_pix, sem_cb, pix_cb, pixel_weight=1.0, semantic_weight=0.0, chunk_size=chunk)
    return sem_only.view(B, s * s), pix_only.view(B, s * s)


@torch.no_grad()
def quantize_views(q: MultiScaleDualQuantizer, f_BChw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Walk the residual pyramid as eval-mode quantization does and return flat (B, L) indices
    for each view: "shared" equals `tokenizer.img_to_codes(...)`, "semantic"/"pixel" are the
    nearest codes by one half's distance on the same residuals."""
    side = f_BChw.shape[-1]
    residual = f_BChw.float()
    views: dict[str, list[torch.Tensor]] = {v: [] for v in VIEWS}
    for s in q.scales:
        r_BCss = q.downsample(residual, s)
        idx_Bl = q.search(r_BCss)
        sem_only, pix_only = nearest_by_half(q, r_BCss)
        views["shared"].append(idx_Bl)
        views["semantic"].append(sem_only)
        views["pixel"].append(pix_only)
        residual = residual - q.upsample(q.indices_to_map(idx_Bl, s), side)
    return {v: torch.cat(parts, dim=1) for v, parts in views.items()}


def agreement(views: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of tokens where the shared index equals each half's nearest code."""
    shared = views["shared"]
    return {v: float((views[v] == shared).float().mean()) for v in VIEWS if v != "shared"}


def write_histograms(usage: UsageCounts, out_dir: Path) -> list[Path]:
    """One PNG per view: a row per scale plus a last row for all scales together, code
    frequencies sorted high to low on a log scale."""

    paths = []
    for view, counts in usage.counts.items():
        path = Path(out_dir) / f"usage_{view}.png"
        usage_histogram(np.concatenate([counts, counts.sum(0, keepdims=True)]), path)
        paths.append(path)
    return paths


@torch.no_grad()
def measure_usage(tokenizer: torch.nn.Module, batches, progress=None) -> tuple[UsageCounts, dict[str, float]]:
    """Usage over an iterable of [-1, 1] image batches; returns counts and view agreement."""
    device = next(tokenizer.parameters()).device
    usage = UsageCounts(tokenizer.scales, tokenizer.codebook_size)
    same = {v: 0.0 for v in VIEWS if v != "shared"}
    tokens = 0
    for img in batches:
        views = quantize_views(tokenizer.quantizer, tokenizer.encode_features(img.to(device)))
        for view, idx in views.items():
            usage.add(view, idx)
        n = views["shared"].numel()
        for view, share in agreement(views).items():
            same[view] += share * n
        tokens += n
        usage.images += img.shape[0]
        if progress:
            progress(usage.images)
    return usage, {v: c / max(tokens, 1) for v, c in same.items()}
