"""Next-scale text-to-image generator on a transformers decoder-only LM (Llama by default).

Sequence (one row per image):

    [ text (T, left-padded) | scale 0 (1) | scale 1 (s_1^2) | ... | scale N-1 (s_N-1^2) ]

- Text positions hold the prompt tokens through the LM's own input embeddings.
- The positions of scale k hold the generator's input for scale k and predict scale k's codes
  (VAR-style: no shift by one). Scale 0's input is a learned start token; scale k >= 1 gets the
  image tokenizer's next-scale input (the running sum of the code features of scales < k,
  upsampled to the final grid and area-downsampled to s_k x s_k) through an MLP projector.
  Every image position adds a learned scale embedding and a learned position embedding; the
  position table has one row per image position of every scale (VAR's `pos_1LC`), so positions
  of different scales never share a row. The LM's RoPE runs on the plain sequence index.
- Logits come from a separate head (hidden -> K image codes); text positions give none.
- Attention is block-causal: text is causal (padding is invisible), an image token sees all
  text and every token of its own and earlier scales. The mask goes to the transformers model
  as a 4D additive float mask, which its mask builder passes through untouched to the sdpa and
  eager kernels.

Multi-step sampling ("the draft fed back"): after scale k is drafted, a refine block of s_k^2
positions is appended. Its inputs are scale k's own inputs plus a second projector of the
draft's code vectors (`lookup_codes(draft)`); it sees what scale k sees plus scale k itself and
the refine block, and nothing sees it. Its logits re-predict scale k, the draft is replaced,
and the block is cropped from the KV cache (normal-mode scale-k keys and values do not depend
on scale k's codes, so they stay valid). Refine positions reuse the RoPE positions right after
scale k. Training appends one such block for a random scale on a share of batches, with the
ground truth corrupted as the draft (GeneratorModelConfig.refine_*).

`generate(use_cache=False)` recomputes the whole sequence at every step, as the official
sampler does; with the same seed it gives the same codes as the cached path.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.lm import build_lm
from tokenflow_cli.generation.sampling import Schedule, cfg_strength, guide, sample_codes
from tokenflow_cli.tokenizer.scales import ScaleLayout
from tokenflow_cli.train.parallel import enable_activation_checkpointing

__all__ = [
    "TEXT_LEVEL",
    "CodeEmbedder",
    "GeneratorOutput",
    "NextScaleGenerator",
    "RefineBlock",
    "TextBatch",
    "block_causal_allowed",
    "build_generator",
    "lm_mask",
]

TEXT_LEVEL = -1  # mask level of text; image scale k has level 2k, its refine block 2k + 1


class CodeEmbedder(Protocol):
    """What the generator needs from the image tokenizer (TokenFlowTokenizer satisfies it)."""

    scales: tuple[int, ...]
    codebook_size: int
    code_dim: int

    def next_scale_inputs(self, idx_BL: torch.Tensor) -> list[torch.Tensor]: ...

    def lookup_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TextBatch:
    """Left-padded prompt token ids and their mask (1 = token, 0 = padding)."""

    ids_BT: torch.Tensor
    mask_BT: torch.Tensor

    def pad_left(self, length: int) -> TextBatch:
        extra = length - self.ids_BT.shape[1]
        if extra <= 0:
            return self
        return TextBatch(F.pad(self.ids_BT, (extra, 0)), F.pad(self.mask_BT, (extra, 0)))

    def cat(self, other: TextBatch) -> TextBatch:
        length = max(self.ids_BT.shape[1], other.ids_BT.shape[1])
        a, b = self.pad_left(length), other.pad_left(length)
        return TextBatch(torch.cat([a.ids_BT, b.ids_BT]), torch.cat([a.mask_BT, b.mask_BT]))


@dataclass
class RefineBlock:
    """A re-prediction of scale `scale_index` given a draft of its codes (B, s^2, code_dim)."""

    scale_index: int
    draft_features_BlC: torch.Tensor


@dataclass
class GeneratorOutput:
    logits_BLK: torch.Tensor  # every image position, scales concatenated coarse to fine
    refine_logits_BlK: torch.Tensor | None = None  # the refine block's, when one was given


def _mlp(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


# --------------------------------------------------------------------------------------------
# Attention mask over a sequence described by levels and validity
# --------------------------------------------------------------------------------------------


def block_causal_allowed(levels_K: torch.Tensor, valid_BK: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Which keys each of the last `num_queries` positions may attend to: (B, 1, q, K) bool.

    Key text: seen by later-or-same text and by every image/refine position. Key image of scale
    k (level 2k): seen by levels >= 2k. Key refine (odd level): seen only by its own block.
    Padding keys are seen by nobody; every position sees itself (no empty softmax rows)."""
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


class _Context:
    """What the LM has seen so far (levels, RoPE positions, validity) and, when caching, its
    KV cache. `extend` runs only the new block with the cache, or everything again without."""

    def __init__(self, model: NextScaleGenerator, use_cache: bool) -> None:
        self.model = model
        self.levels: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []  # only kept when recomputing
        self.cache = None
        if use_cache:

            self.cache = DynamicCache(config=model.lm.config)
            # transformers 5.24 renamed `past_key_values` to `cache` (old name deprecated)
            params = inspect.signature(model.lm.forward).parameters
            self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def extend(self, embeds_BqH: torch.Tensor, levels_q: torch.Tensor, positions_q: torch.Tensor,
               valid_Bq: torch.Tensor, run: bool = True) -> torch.Tensor | None:
        """Append a block; return the LM's hidden states for it (None when `run` is False and
        nothing is cached: recomputation defers the work to the next block)."""
        self.levels.append(levels_q)
        self.positions.append(positions_q)
        self.valid.append(valid_Bq)
        levels, valid = torch.cat(self.levels), torch.cat(self.valid, dim=1)
        lm, q = self.model.lm, embeds_BqH.shape[1]
        if self.cache is not None:
            mask = lm_mask(block_causal_allowed(levels, valid, q), lm, embeds_BqH.dtype)
            out = lm(inputs_embeds=embeds_BqH, attention_mask=mask, position_ids=positions_q[None],
                     use_cache=True, **{self.cache_kwarg: self.cache})
            return out.last_hidden_state
        self.embeds.append(embeds_BqH)
        return self.recompute()[:, -q:] if run else None

    def recompute(self) -> torch.Tensor:
        """The LM over everything recorded, from scratch: hidden states (B, K, H)."""
        levels, valid = torch.cat(self.levels), torch.cat(self.valid, dim=1)
        x = torch.cat(self.embeds, dim=1)
        mask = lm_mask(block_causal_allowed(levels, valid, levels.shape[0]), self.model.lm, x.dtype)
        positions = torch.cat(self.positions)[None]
        out = self.model.lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state

    def rollback(self, num_positions: int) -> None:
        """Forget the last block (of `num_positions`)."""
        for items in (self.levels, self.positions, self.valid, self.embeds):
            if items:
                items.pop()
        if self.cache is not None:
            self.cache.crop(-num_positions)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class NextScaleGenerator(nn.Module):
    def __init__(self, cfg: GeneratorModelConfig, lm: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        self.lm = lm
        hidden = lm.config.hidden_size
        self.scales = tuple(cfg.scales)
        self.layout = ScaleLayout(self.scales)
        self.offsets = list(self.layout.offsets)
        self.num_image_tokens = self.layout.num_tokens
        self.start_token = nn.Parameter(torch.empty(1, 1, hidden))
        self.scale_embed = nn.Parameter(torch.empty(len(self.scales), hidden))
        self.pos_embed = nn.Parameter(torch.empty(self.num_image_tokens, hidden))
        self.projector = _mlp(cfg.code_dim, hidden)
        self.draft_projector = _mlp(cfg.code_dim, hidden)
        self.head = nn.Linear(hidden, cfg.codebook_size)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        """Init everything outside the LM; the draft projector's output starts at zero so an
        untrained refine block behaves like a plain re-prediction."""
        std = self.config.init_std
        for p in (self.start_token, self.scale_embed, self.pos_embed):
            nn.init.normal_(p, std=std)
        for layer in [*self.projector, *self.draft_projector, self.head]:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=std)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.draft_projector[-1].weight)

    def check_embedder(self, embedder: CodeEmbedder) -> None:
        theirs = (tuple(embedder.scales), embedder.codebook_size, embedder.code_dim)
        ours = (self.scales, self.config.codebook_size, self.config.code_dim)
        if theirs != ours:
            raise ValueError(f"image tokenizer (scales, K, code_dim) {theirs} != the generator's {ours}")

    # ---- embeddings ---------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return self.start_token.dtype

    def scale_slice(self, si: int) -> slice:
        return self.layout.span(si)

    def embed_scale(self, si: int, input_BlC: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Scale si's input embeddings (B, s^2, H); `input_BlC` is None for the start token."""
        if si == 0:
            x = self.start_token.expand(batch, -1, -1)
        else:
            x = self.projector(input_BlC.to(self._dtype))
        return x + self.scale_embed[si] + self.pos_embed[self.scale_slice(si)]

    def embed_refine(self, si: int, scale_embeds_BlH: torch.Tensor, draft_BlC: torch.Tensor) -> torch.Tensor:
        return scale_embeds_BlH + self.draft_projector(draft_BlC.to(self._dtype))

    def _text_meta(self, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        T = text.ids_BT.shape[1]
        device = text.ids_BT.device
        embeds = self.lm.get_input_embeddings()(text.ids_BT)
        levels = torch.full((T,), TEXT_LEVEL, device=device)
        return embeds, levels, torch.arange(T, device=device), text.mask_BT.bool()

    def _image_meta(self, si: int, T: int, batch: int, refine: bool, device: torch.device):
        """Levels, RoPE positions and validity of scale si's block (or its refine block)."""
        n = self.scales[si] ** 2
        first = T + self.offsets[si] + (n if refine else 0)
        levels = torch.full((n,), 2 * si + int(refine), device=device)
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)
        return levels, torch.arange(first, first + n, device=device), valid

    # ---- teacher forcing ------------------------------------------------------------------

    def forward(
        self, text: TextBatch, scale_inputs: list[torch.Tensor], refine: RefineBlock | None = None
    ) -> GeneratorOutput:
        """All scales in one pass: `scale_inputs` are the tokenizer's next-scale inputs for
        scales 1..N-1. Returns logits (B, L, K) and, with a refine block, its logits too."""
        B, T = text.ids_BT.shape
        device = text.ids_BT.device
        ctx = self._start(text, use_cache=False)
        scale_embeds = []
        for si in range(len(self.scales)):
            scale_embeds.append(self.embed_scale(si, scale_inputs[si - 1] if si else None, B))
            ctx.extend(scale_embeds[-1], *self._image_meta(si, T, B, False, device), run=False)
        if refine is not None:
            si = refine.scale_index
            embeds = self.embed_refine(si, scale_embeds[si], refine.draft_features_BlC)
            ctx.extend(embeds, *self._image_meta(si, T, B, True, device), run=False)
        logits = self.head(ctx.recompute()[:, T:])
        L = self.num_image_tokens
        return GeneratorOutput(logits[:, :L], logits[:, L:] if refine is not None else None)

    # ---- step by step ---------------------------------------------------------------------

    def _start(self, text: TextBatch, use_cache: bool) -> _Context:
        ctx = _Context(self, use_cache)
        ctx.extend(*self._text_meta(text), run=False)
        return ctx

    def _step(self, ctx: _Context, embeds_BlH: torch.Tensor, si: int, T: int, refine: bool) -> torch.Tensor:
        meta = self._image_meta(si, T, embeds_BlH.shape[0], refine, embeds_BlH.device)
        return self.head(ctx.extend(embeds_BlH, *meta))

    @torch.no_grad()
    def stepwise_logits(
        self, text: TextBatch, scale_inputs: list[torch.Tensor], use_cache: bool = True
    ) -> torch.Tensor:
        """Teacher-forced logits computed scale by scale, as generation does (B, L, K)."""
        B, T = text.ids_BT.shape
        ctx = self._start(text, use_cache)
        out = []
        for si in range(len(self.scales)):
            embeds = self.embed_scale(si, scale_inputs[si - 1] if si else None, B)
            out.append(self._step(ctx, embeds, si, T, refine=False))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(
        self,
        embedder: CodeEmbedder,
        text: TextBatch,
        negative: TextBatch | None = None,
        schedule: Schedule = (),
        cfg: float = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Prompts -> image codes (B, L). With `negative` (empty or negative prompts, one per
        row) the batch is doubled for classifier-free guidance with the linear ramp; without
        it `cfg` must be 0. Each scale is drawn with the schedule's first pass, then re-predicted
        from its draft once per further pass (see the module docstring)."""
        if not schedule:
            raise ValueError("empty sampling schedule")
        if negative is None and cfg != 0:
            raise ValueError("cfg != 0 needs the unconditional prompts (`negative`)")
        self.check_embedder(embedder)
        B = text.ids_BT.shape[0]
        both = text if negative is None else text.cat(negative)
        T, rows = both.ids_BT.shape[1], both.ids_BT.shape[0]
        ctx = self._start(both, use_cache)
        idx_BL = torch.zeros(B, self.num_image_tokens, dtype=torch.long, device=text.ids_BT.device)
        scale_input = None
        N = len(self.scales)
        for si in range(N):
            strength = cfg_strength(cfg, si, N)
            embeds = self.embed_scale(si, scale_input, B).repeat(rows // B, 1, 1)
            logits = self._step(ctx, embeds, si, T, refine=False)
            draft = sample_codes(self._guided(logits, B, strength), schedule[0], temperature, generator)
            for sampling_pass in schedule[1:]:
                draft_BlC = embedder.lookup_codes(draft).repeat(rows // B, 1, 1)
                logits = self._step(ctx, self.embed_refine(si, embeds, draft_BlC), si, T, refine=True)
                ctx.rollback(embeds.shape[1])
                draft = sample_codes(self._guided(logits, B, strength), sampling_pass, temperature, generator)
            idx_BL[:, self.scale_slice(si)] = draft
            if si + 1 < N:
                scale_input = embedder.next_scale_inputs(idx_BL)[si]
        return idx_BL

    @staticmethod
    def _guided(logits_RlK: torch.Tensor, batch: int, strength: float) -> torch.Tensor:
        logits = logits_RlK.float()
        if logits.shape[0] == batch:
            return logits
        return guide(logits[:batch], logits[batch:], strength)


def build_generator(cfg: GeneratorModelConfig, lm_config: dict | None = None) -> NextScaleGenerator:
    """The generator with its LM (see `build_lm`); new parts initialised from cfg.init_std."""
    if not (cfg.scales and cfg.codebook_size and cfg.code_dim):
        raise ValueError("the generator's code space (model.scales, codebook_size, code_dim) is empty: "
                         "attach the image tokenizer's with generation.config.attach_code_space")
    lm = build_lm(cfg, lm_config)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    return NextScaleGenerator(cfg, lm)

