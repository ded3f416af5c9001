"""What the generator's LM has seen so far, and the block-causal mask over it.

A sequence is described by one mask level per position: text is `TEXT_LEVEL`, the positions
of image scale k are level 2k, a re-prediction block (generation/multistep.py) an odd level:
2k + 1 for our trained refine block of scale k (it sees scale k), 2k - 1 for the official
in-place re-run of scale k (it sees only scales < k). The mask goes to the transformers model
as a 4D mask, which its mask builder passes through untouched to the sdpa and eager kernels.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

__all__ = ["TEXT_LEVEL", "LMContext", "block_causal_allowed", "lm_mask"]

TEXT_LEVEL = -1  # mask level of text; image scale k has level 2k, re-prediction blocks odd levels


def block_causal_allowed(levels_K: torch.Tensor, valid_BK: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Which keys each of the last `num_queries` positions may attend to: (B, 1, q, K) bool.

    Key text: seen by later-or-same text and by every image/refine position. Key image of scale
    k (level 2k): seen by levels >= 2k. Key of a re-prediction block (odd level): seen only by
    its own block. Padding keys are seen by nobody; every position sees itself (no empty
    softmax rows)."""
    K = levels_K.shape[0]
    seq_K = torch.arange(K, device=levels_K.device)
    seq_q = seq_K[K - num_queries :]
    level_q, level_k = levels_K[K - num_queries :, None], levels_K[None, :]
    is_text_k, is_text_q = level_k == TEXT_LEVEL, level_q == TEXT_LEVEL
    text_ok = is_text_k & (~is_text_q | (seq_K[None, :] <= seq_q[:, None]))
    image_ok = ~is_text_k & (level_k % 2 == 0) & (level_q >= level_k)
    refine_ok = ~is_text_k & (level_k % 2 == 1) & (level_q == level_k)
    allowed_qK = (text_ok | image_ok | refine_ok)[None] & valid_BK[:, None, :]
    allowed_qK = allowed_qK | (seq_K[None, None, :] == seq_q[None, :, None])
    return allowed_qK[:, None]


def lm_mask(allowed: torch.Tensor, lm: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form the LM's attention kernel takes: bool "may attend" for sdpa
    (dtype-free under autocast), 0 / most-negative float for eager (which adds it)."""
    if lm.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class LMContext:
    """The levels, RoPE positions and validity of what the LM has seen and, when caching, its
    KV cache. `extend` runs only the new block with the cache, or everything again without
    (the official sampler's recompute-all)."""

    def __init__(self, lm: nn.Module, use_cache: bool) -> None:
        self.lm = lm
        self.levels: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []  # only kept when recomputing
        self.cache = None
        if use_cache:
            self.cache = DynamicCache(config=lm.config)
            # transformers 5.24 renamed `past_key_values` to `cache` (old name deprecated)
            params = inspect.signature(lm.forward).parameters
            self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def extend(self, embeds_BqH: torch.Tensor, levels_q: torch.Tensor, positions_q: torch.Tensor,
               valid_Bq: torch.Tensor, run: bool = True) -> torch.Tensor | None:
        """Append a block; return the LM's hidden states for it (None when `run` is False and
        nothing is cached: recomputation defers the work to the next block)."""
        self.levels.append(levels_q)
        self.positions.append(positions_q)
        self.valid.append(valid_Bq)
        q = embeds_BqH.shape[1]
        if self.cache is not None:
            levels, valid = torch.cat(self.levels), torch.cat(self.valid, dim=1)
            mask = lm_mask(block_causal_allowed(levels, valid, q), self.lm, embeds_BqH.dtype)
            out = self.lm(inputs_embeds=embeds_BqH, attention_mask=mask, position_ids=positions_q[None],
                          use_cache=True, **{self.cache_kwarg: self.cache})
            return out.last_hidden_state
        self.embeds.append(embeds_BqH)
        return self.recompute()[:, -q:] if run else None

    def recompute(self) -> torch.Tensor:
        """The LM over everything recorded, from scratch: hidden states (B, K, H)."""
        levels, valid = torch.cat(self.levels), torch.cat(self.valid, dim=1)
        x = torch.cat(self.embeds, dim=1)
        mask = lm_mask(block_causal_allowed(levels, valid, levels.shape[0]), self.lm, x.dtype)
        positions = torch.cat(self.positions)[None]
        return self.lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state

    def rollback(self, num_positions: int) -> None:
        """Forget the last block (of `num_positions`)."""
        for items in (self.levels, self.positions, self.valid, self.embeds):
            if items:
                items.pop()
        if self.cache is not None:
            self.cache.crop(-num_positions)
