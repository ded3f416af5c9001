"""A codebook atlas (issue 24): which image patches each code stands for at the final scale.

For every final-scale position of every image three assignments are recorded: the shared index
the tokenizer emits, and, on the same final-scale residual, the nearest code by the semantic
half's distance alone and by the pixel half's alone (the views of `eval usage`). A position
covers a patch of p = image_size / s_N pixels (4 px for the 32 px toy tokenizer; an image whose
size is not a multiple of s_N is resized to s_N * p first). The chosen codes are the most used
(shared index) plus a seeded sample of other used codes; for each, a seeded sample of example
patches per assignment, shown as context crops (eval/atlas_render.py).

Figures, per assignment, over all positions (lower = purer clusters):
- within-code variance share = sum over codes of the squared deviations of the members from
  their code's mean / the squared deviations of all positions from the overall mean (1 - R^2),
  for the raw patch pixels ("pixel") and for the unit semantic half of the final-scale residual
  ("semantic", the vector the semantic distance compares). "random" is the shared assignment
  shuffled over positions (same code sizes): what no clustering at all gives.
- agreement: the share of positions where the shared index equals each half's nearest code.

The encoder runs twice per batch (`img_to_codes` for the official indices, `encode_features` for
the residual); the images are kept in memory as uint8, so `limit` the input for big sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenflow_cli.eval.atlas_render import VIEWS, AtlasCode, AtlasExample, AtlasSheet, context_crop
from tokenflow_cli.eval.visual import to_uint8
from tokenflow_cli.tokenizer.inference import matmul_precision, options_of
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.quantizer import MultiScaleDualQuantizer
from tokenflow_cli.tokenizer.usage_report import nearest_by_half


@dataclass
class AtlasOptions:
    top: int = 24  # the most used codes shown
    random: int = 12  # plus this many other used codes, a seeded sample
    per_code: int = 8  # example patches per code and assignment
    seed: int = 0  # code sample, example samples and the "random" baseline

    def __post_init__(self) -> None:
        if min(self.top, self.random) < 0 or self.top + self.random < 1 or self.per_code < 1:
            raise ValueError("atlas needs top + random >= 1 codes (neither negative) and per_code >= 1")


@dataclass
class FinalScaleViews:
    residual: torch.Tensor  # (B, C, s, s) fp32: what the final-scale search quantizes
    shared: torch.Tensor  # (B, s*s) the tokenizer's index
    semantic: torch.Tensor  # (B, s*s) nearest code by the semantic half alone
    pixel: torch.Tensor  # (B, s*s) nearest code by the pixel half alone


@dataclass
class CodeAtlas:
    scale: int  # s_N, the final scale
    patch_px: int  # p
    codebook_size: int
    positions: int  # images * s_N^2
    counts: dict[str, np.ndarray]  # per assignment, (K,) positions per code
    agreement: dict[str, float]  # "semantic"/"pixel": share of positions equal to the shared index
    within_share: dict[str, dict[str, float]]  # assignment (+ "random") -> {"pixel": ..., "semantic": ...}
    sheet: AtlasSheet  # the chosen codes with their examples, for rendering

    def figures(self) -> dict:
        """JSON-ready numbers (no crops): what atlas.json records."""
        codes = [{"index": c.index, "group": c.group, "counts": c.counts, "pixel_spread": c.pixel_spread,
                  "semantic_coherence": c.semantic_coherence,
                  "examples": {v: [[e.image, e.row, e.col] for e in c.examples[v]] for v in VIEWS}}
                 for c in self.sheet.codes]
        return {"scale": self.scale, "patch_px": self.patch_px, "codebook_size": self.codebook_size,
                "images": len(self.sheet.sources), "positions": self.positions,
                "used": {v: int((c > 0).sum()) for v, c in self.counts.items()},
                "agreement_with_shared": self.agreement, "within_code_variance_share": self.within_share,
                "codes": codes, "sources": self.sheet.sources}


def final_scale_residual(q: MultiScaleDualQuantizer, f_BChw: torch.Tensor, idx_BL: torch.Tensor) -> torch.Tensor:
    """The residual the final scale quantizes, (B, C, s_N, s_N): the encoder map minus every
    coarser scale's codes, subtracted one scale at a time as eval-mode `forward` does (the same
    float operations, so `q.search` of it gives the final scale's shared indices)."""
    side = f_BChw.shape[-1]
    residual = f_BChw.float()
    per_scale = q.split_indices(idx_BL)
    for si, s in enumerate(q.scales[:-1]):
        residual = residual - q.upsample(q.indices_to_map(per_scale[si], s), side)
    return q.downsample(residual, q.scales[-1])


@torch.no_grad()
def final_scale_views(q: MultiScaleDualQuantizer, f_BChw: torch.Tensor, idx_BL: torch.Tensor) -> FinalScaleViews:
    """The three assignments of every final-scale position, given the encoder map and its codes."""
    residual = final_scale_residual(q, f_BChw, idx_BL)
    semantic, pixel = nearest_by_half(q, residual)
    return FinalScaleViews(residual, q.split_indices(idx_BL)[-1], semantic, pixel)


def patch_px(tok: TokenFlowTokenizer) -> int:
    return max(1, round(tok.image_size / tok.scales[-1]))


def within_code_stats(x_PD: torch.Tensor, labels_P: torch.Tensor, K: int) -> tuple[torch.Tensor, float]:
    """Per code the summed squared deviation of its members from their mean (K,), and the share
    of the total squared deviation (about the overall mean) left within codes."""
    counts = torch.bincount(labels_P, minlength=K).clamp_min(1).unsqueeze(1).double()
    means = torch.zeros(K, x_PD.shape[1], dtype=torch.float64).index_add_(0, labels_P, x_PD.double()) / counts
    dev_P = (x_PD.double() - means[labels_P]).pow(2).sum(1)
    total = float((x_PD.double() - x_PD.double().mean(0)).pow(2).sum())
    within_K = torch.zeros(K, dtype=torch.float64).index_add_(0, labels_P, dev_P)
    return within_K, float(within_K.sum()) / max(total, 1e-12)


class AtlasCollector:
    """Accumulates the assignments, the unit semantic residuals and the images, batch by batch."""

    def __init__(self, tok: TokenFlowTokenizer) -> None:
        self.tok, self.scale, self.patch_px = tok, tok.scales[-1], patch_px(tok)
        self.assigned: dict[str, list[torch.Tensor]] = {v: [] for v in VIEWS}
        self.semantic: list[torch.Tensor] = []  # (B*s*s, d_sem) unit vectors
        self.images: list[np.ndarray] = []  # (B, s*p, s*p, 3) uint8
        self.sources: list[str] = []

    @torch.no_grad()
    def add(self, img_B3HW: torch.Tensor, keys: list[str]) -> None:
        tok = self.tok
        img = img_B3HW.to(tok.device)
        idx_BL = tok.img_to_codes(img).indices
        with matmul_precision(options_of(tok).tf32):
            f = tok.encode_features(img)
        views = final_scale_views(tok.quantizer, f, idx_BL)
        for view in VIEWS:
            self.assigned[view].append(getattr(views, view).cpu())
        z_sem = views.residual[:, : tok.config.quantizer.semantic_dim].permute(0, 2, 3, 1).flatten(0, 2)
        self.semantic.append(F.normalize(z_sem, dim=1).cpu())
        side = self.scale * self.patch_px
        pictures = to_uint8(img)
        if pictures.shape[1] != side:
            pictures = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.BICUBIC)) for p in pictures])
        self.images.append(pictures)
        self.sources.extend(keys)

    def finish(self, options: AtlasOptions) -> CodeAtlas:
        if not self.sources:
            raise ValueError("no images were encoded")
        K = self.tok.codebook_size
        labels = {v: torch.cat(parts).reshape(-1) for v, parts in self.assigned.items()}
        rng = np.random.default_rng(options.seed)
        labels["random"] = labels["shared"][torch.from_numpy(rng.permutation(len(labels["shared"])))]
        grid = PatchGrid(np.concatenate(self.images), self.scale, self.patch_px)
        patches, semantic = grid.patches(), torch.cat(self.semantic)
        within, shares = {}, {}
        for view, lab in labels.items():
            within[view], pixel_share = within_code_stats(patches, lab, K)
            shares[view] = {"pixel": pixel_share, "semantic": within_code_stats(semantic, lab, K)[1]}
        counts = {v: torch.bincount(labels[v], minlength=K).numpy() for v in VIEWS}
        agreement = {v: float((labels[v] == labels["shared"]).double().mean()) for v in VIEWS if v != "shared"}
        chosen = choose_codes(counts["shared"], options, rng)
        codes = [_code(grid, index, group, counts, labels, within["shared"], semantic, options.per_code, rng)
                 for index, group in chosen]
        summary = (f"{len(self.sources)} images, {len(labels['shared'])} final-scale positions "
                   f"({self.scale}x{self.scale}, {self.patch_px} px patches); shared index = semantic-nearest "
                   f"{agreement['semantic']:.1%}, = pixel-nearest {agreement['pixel']:.1%}; within-code pixel "
                   "variance share " + ", ".join(f"{v} {shares[v]['pixel']:.3f}" for v in shares))
        sheet = AtlasSheet(f"Codebook atlas: {Path(self.tok.source).name}", self.patch_px, codes, self.sources, summary)
        return CodeAtlas(self.scale, self.patch_px, K, len(labels["shared"]), counts, agreement, shares, sheet)

@dataclass
class PatchGrid:
    """The kept images and the final-scale patch grid over them."""

    images: np.ndarray  # (N, s*p, s*p, 3) uint8
    scale: int  # s
    patch_px: int  # p

    def patches(self) -> torch.Tensor:
        """(N*s*s, p*p*3) float in [0, 1]: every position's patch, row-major within each image."""
        s, p, n = self.scale, self.patch_px, len(self.images)
        blocks = self.images.reshape(n, s, p, s, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return torch.from_numpy(blocks.reshape(n * s * s, p * p * 3).astype(np.float32) / 255.0)

    def example(self, position: int) -> AtlasExample:
        image, cell = divmod(position, self.scale * self.scale)
        row, col = divmod(cell, self.scale)
        return AtlasExample(image, row, col, context_crop(self.images[image], row, col, self.patch_px).copy())


def _code(grid: PatchGrid, index: int, group: str, counts: dict[str, np.ndarray], labels: dict[str, torch.Tensor],
          within_shared: torch.Tensor, semantic: torch.Tensor, per_code: int, rng: np.random.Generator) -> AtlasCode:
    """One chosen code: its counts, purity and a seeded sample of examples per assignment."""
    n = int(counts["shared"][index])
    examples = {}
    for view in VIEWS:
        where = torch.nonzero(labels[view] == index).reshape(-1).numpy()
        pick = rng.choice(where, size=min(per_code, len(where)), replace=False) if len(where) else where
        examples[view] = [grid.example(int(pos)) for pos in pick]
    return AtlasCode(
        index, group, {v: int(counts[v][index]) for v in VIEWS},
        pixel_spread=float(within_shared[index]) / max(n, 1) / (3 * grid.patch_px**2),
        semantic_coherence=float(semantic[labels["shared"] == index].mean(0).norm()) if n else 0.0,
        examples=examples,
    )


def choose_codes(counts_K: np.ndarray, options: AtlasOptions, rng: np.random.Generator) -> list[tuple[int, str]]:
    """The `top` most used codes (ties: lower index first), then a seeded sample of `random` other
    used codes (by usage); [(code, "top" | "random")]."""
    order = np.lexsort((np.arange(len(counts_K)), -counts_K))
    used = order[counts_K[order] > 0]
    top, rest = used[: options.top], used[options.top :]
    sample = rng.choice(rest, size=min(options.random, len(rest)), replace=False) if len(rest) else rest
    sample = sorted(sample.tolist(), key=lambda i: (-counts_K[i], i))
    return [(int(i), "top") for i in top] + [(int(i), "random") for i in sample]


def collect_atlas(tok: TokenFlowTokenizer, batches: Iterable[tuple[torch.Tensor, list[str]]],
                  options: AtlasOptions, progress: Callable[[int], None] | None = None) -> CodeAtlas:
    """Encode (images in [-1, 1], their names) batches and build the atlas; progress(images done)."""
    collector = AtlasCollector(tok)
    done = 0
    for images, keys in batches:
        collector.add(images, keys)
        done += len(keys)
        if progress:
            progress(done)
    return collector.finish(options)
