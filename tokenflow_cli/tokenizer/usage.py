"""Live codebook health: per-scale share of codes hit in a rolling window, and code perplexity."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class UsageTracker:
    """Rolling-window usage per scale, in training steps.

    `last_hit[s, k]` is the last step code k was chosen at scale s, so "hit in the last W steps"
    costs one (S, K) tensor however long the window; the code histogram behind the perplexity
    is an exponential moving average with time constant W. Scale sides label the figures:
    `usage@16` is the share of the K codes hit on the 16x16 map in the window.
    """

    def __init__(self, scales: tuple[int, ...], codebook_size: int, window: int, device: torch.device) -> None:
        self.scales = tuple(scales)
        self.window = max(int(window), 1)
        self.last_hit = torch.full((len(scales), codebook_size), -1, dtype=torch.long, device=device)
        self.hist = torch.zeros(len(scales), codebook_size, device=device)

    @torch.no_grad()
    def update(self, per_scale_idx: list[torch.Tensor], step: int) -> None:
        """Indices of one step, [(B, s*s) or (B, s, s)] per scale; -1 marks a dropped scale."""
        decay = 1.0 - 1.0 / self.window
        self.hist.mul_(decay)
        for si, idx in enumerate(per_scale_idx):
            flat = idx.reshape(-1)
            flat = flat[flat >= 0].to(self.last_hit.device)
            if flat.numel() == 0:
                continue
            self.last_hit[si, flat] = step
            counts = torch.bincount(flat, minlength=self.hist.shape[1]).float()
            self.hist[si] += (1.0 - decay) * counts / flat.numel()

    def summary(self, step: int) -> dict[str, float]:
        """{"usage", "usage@S"..., "ppl", "ppl@S"...}; all-reduced over ranks under DDP."""
        last_hit, hist = self.last_hit.clone(), self.hist.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(last_hit, op=dist.ReduceOp.MAX)
            dist.all_reduce(hist)
        recent = (last_hit >= 0) & (last_hit > step - self.window)
        out: dict[str, float] = {"usage": float(recent.any(0).float().mean())}
        for s, row in zip(self.scales, recent):
            out[f"usage@{s}"] = float(row.float().mean())
        out["ppl"] = perplexity(hist.sum(0))
        for s, row in zip(self.scales, hist):
            out[f"ppl@{s}"] = perplexity(row)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last_hit": self.last_hit, "hist": self.hist}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_hit.copy_(state["last_hit"])
        self.hist.copy_(state["hist"])


def perplexity(counts_K: torch.Tensor | np.ndarray) -> float:
    """exp(entropy) of a code histogram (counts or EMA weights, torch or numpy): K when all codes
    are equally used, 1 for one code, 0 for an empty histogram."""
    counts = torch.as_tensor(counts_K).double().flatten()
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def codes_hit(per_scale_idx: list[torch.Tensor], codebook_size: int) -> torch.Tensor:
    """(S, K) counts of one set of codes (an eval pass), ignoring dropped scales."""
    out = torch.zeros(len(per_scale_idx), codebook_size, dtype=torch.long)
    for si, idx in enumerate(per_scale_idx):
        flat = idx.reshape(-1).cpu()
        out[si] += torch.bincount(flat[flat >= 0], minlength=codebook_size)
    return out
