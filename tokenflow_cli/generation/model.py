"""Next-scale text-to-image generator on a transformers decoder-only LM (Llama by default).

Sequence (one row per image):

    [ text (T, left-padded) | scale 0 (1) | scale 1 (s_1^2) | ... | scale N-1 (s_N-1^2) ]

- Text positions hold the prompt tokens through the LM's own input embeddings (the layout,
  generation/text_layout.py: ours, or the official fixed length with the `<img>` marker).
- The positions of scale k hold the generator's input for scale k and predict scale k's codes
  (VAR-style: no shift by one). Scale 0's input is a learned start token; scale k >= 1 gets the
  next-scale input built from the codes of scales < k (generation/next_scale.py: `var` or the
  official `chained`) through an MLP projector. Every image position adds a learned scale
  embedding and a learned position embedding; the position table has one row per image
  position of every scale (VAR's `pos_1LC`). The LM's RoPE runs on the plain sequence index.
- Logits come from an image head over the K codes (IMAGE_HEADS); text positions give none.
- Attention is block-causal (generation/context.py): text is causal (padding is invisible), an
  image token sees all text and every token of its own and earlier scales.

Multi-step sampling re-predicts each scale from its draft (generation/multistep.py: our trained
`refine` block, or the official untrained `inplace` re-run), with the KV cache for every pass.
Classifier-free guidance runs the prompts and the negative prompts as one doubled batch.

`generate(use_cache=False)` is the official sampler's work: the whole sequence recomputed at
every call and the next-scale inputs rebuilt from all codes; it gives the same codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow_cli.generation.config import GeneratorModelConfig
from tokenflow_cli.generation.context import TEXT_LEVEL, LMContext
from tokenflow_cli.generation.lm import build_lm
from tokenflow_cli.generation.multistep import MultiStepMode, multi_step_mode
from tokenflow_cli.generation.next_scale import NEXT_SCALE_INPUTS, Replayed, running_map, teacher_inputs
from tokenflow_cli.generation.sampling import Schedule, cfg_strength, guide, sample_codes
from tokenflow_cli.generation.text_layout import text_layout
from tokenflow_cli.tokenizer.scales import ScaleLayout
from tokenflow_cli.train.parallel import enable_activation_checkpointing

__all__ = [
    "IMAGE_HEADS",
    "CodeEmbedder",
    "GeneratorOutput",
    "NextScaleGenerator",
    "RefineBlock",
    "TextBatch",
    "build_generator",
]

# model.image_head -> whether the head has a bias. "shared-vocabulary" is the official head:
# one LM head over text + image ids whose text logits are set to -inf when sampling, which is
# the image rows alone (the text rows predict nothing the sampler keeps).
IMAGE_HEADS: dict[str, bool] = {"separate": True, "shared-vocabulary": False}


class CodeEmbedder(Protocol):
    """What the generator needs from the image tokenizer (TokenFlowTokenizer satisfies it)."""

    scales: tuple[int, ...]
    codebook_size: int
    code_dim: int

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


class NextScaleGenerator(nn.Module):
    def __init__(self, cfg: GeneratorModelConfig, lm: nn.Module) -> None:
        super().__init__()
        if cfg.image_head not in IMAGE_HEADS:
            raise ValueError(f"unknown model.image_head {cfg.image_head!r}; choose one of {sorted(IMAGE_HEADS)}")
        if cfg.next_scale_input not in NEXT_SCALE_INPUTS:
            raise ValueError(f"unknown model.next_scale_input {cfg.next_scale_input!r}; choose one of "
                             f"{sorted(NEXT_SCALE_INPUTS)}")
        self.config = cfg
        self.lm = lm
        hidden = lm.config.hidden_size
        self.scales = tuple(cfg.scales)
        self.layout = ScaleLayout(self.scales)
        self.offsets = list(self.layout.offsets)
        self.num_image_tokens = self.layout.num_tokens
        self.text_layout = text_layout(cfg.text_layout)
        self.multi_step = multi_step_mode(cfg.multi_step)
        self.start_token = nn.Parameter(torch.empty(1, 1, hidden))
        self.scale_embed = nn.Parameter(torch.empty(len(self.scales), hidden))
        self.pos_embed = nn.Parameter(torch.empty(self.num_image_tokens, hidden))
        self.projector = _mlp(cfg.code_dim, hidden)
        self.draft_projector = _mlp(cfg.code_dim, hidden) if self.multi_step.trained else None
        self.head = nn.Linear(hidden, cfg.codebook_size, bias=IMAGE_HEADS[cfg.image_head])
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        """Init everything outside the LM; the draft projector's output starts at zero so an
        untrained refine block behaves like a plain re-prediction."""
        std = self.config.init_std
        for p in (self.start_token, self.scale_embed, self.pos_embed):
            nn.init.normal_(p, std=std)
        for layer in [*self.projector, *(self.draft_projector or ()), self.head]:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if self.draft_projector is not None:
            nn.init.zeros_(self.draft_projector[-1].weight)

    def check_embedder(self, embedder: CodeEmbedder) -> None:
        theirs = (tuple(embedder.scales), embedder.codebook_size, embedder.code_dim)
        ours = (self.scales, self.config.codebook_size, self.config.code_dim)
        if theirs != ours:
            raise ValueError(f"image tokenizer (scales, K, code_dim) {theirs} != the generator's {ours}")

    def scale_inputs(self, embedder: CodeEmbedder, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forcing inputs of scales 1..N-1 under this model's next-scale rule."""
        return teacher_inputs(self.config.next_scale_input, embedder, idx_BL)

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
        if self.text_layout.level_embed_on_text:
            embeds = embeds + self.scale_embed[0]
        levels = torch.full((T,), TEXT_LEVEL, device=device)
        return embeds, levels, torch.arange(T, device=device), text.mask_BT.bool()

    def _image_meta(self, si: int, T: int, batch: int, device: torch.device, mode: MultiStepMode | None = None):
        """Levels, RoPE positions and validity of scale si's block, or of its re-prediction
        block under `mode`."""
        n = self.scales[si] ** 2
        start = T + self.offsets[si]
        level = 2 * si if mode is None else mode.level(si)
        first = start if mode is None else mode.first_position(si, start, n)
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)
        return torch.full((n,), level, device=device), torch.arange(first, first + n, device=device), valid

    # ---- teacher forcing ------------------------------------------------------------------

    def forward(
        self, text: TextBatch, scale_inputs: list[torch.Tensor], refine: RefineBlock | None = None
    ) -> GeneratorOutput:
        """All scales in one pass: `scale_inputs` are the next-scale inputs for scales 1..N-1
        (`scale_inputs()`). Returns logits (B, L, K) and, with a refine block, its logits too."""
        B, T = text.ids_BT.shape
        device = text.ids_BT.device
        ctx = self._start(text, use_cache=False)
        scale_embeds = []
        for si in range(len(self.scales)):
            scale_embeds.append(self.embed_scale(si, scale_inputs[si - 1] if si else None, B))
            ctx.extend(scale_embeds[-1], *self._image_meta(si, T, B, device), run=False)
        if refine is not None:
            if not self.multi_step.trained:
                raise ValueError(f"model.multi_step {self.multi_step.name!r} has no trained refine block")
            si = refine.scale_index
            embeds = self.embed_refine(si, scale_embeds[si], refine.draft_features_BlC)
            ctx.extend(embeds, *self._image_meta(si, T, B, device, self.multi_step), run=False)
        logits = self.head(ctx.recompute()[:, T:])
        L = self.num_image_tokens
        return GeneratorOutput(logits[:, :L], logits[:, L:] if refine is not None else None)

    # ---- step by step ---------------------------------------------------------------------

    def _start(self, text: TextBatch, use_cache: bool) -> LMContext:
        ctx = LMContext(self.lm, use_cache)
        ctx.extend(*self._text_meta(text), run=False)
        return ctx

    def _step(self, ctx: LMContext, embeds_BlH: torch.Tensor, si: int, T: int,
              mode: MultiStepMode | None = None) -> torch.Tensor:
        meta = self._image_meta(si, T, embeds_BlH.shape[0], embeds_BlH.device, mode)
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
            out.append(self._step(ctx, embeds, si, T))
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
        keep_ties: bool = False,
        on_sample: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Prompts -> image codes (B, L). With `negative` (empty or negative prompts, one per
        row) the batch is doubled for classifier-free guidance with the linear ramp; without
        it `cfg` must be 0. Each scale is drawn with the schedule's first pass, then re-predicted
        from its draft once per further pass (generation/multistep.py). `keep_ties` keeps every
        code tied with the k-th in top-k (official). `on_sample(si, pass, guided_BlK, drawn_Bl)`
        sees every sampler call's guided logits and draw (tests replay them in a reference)."""
        if not schedule:
            raise ValueError("empty sampling schedule")
        if negative is None and cfg != 0:
            raise ValueError("cfg != 0 needs the unconditional prompts (`negative`)")
        self.check_embedder(embedder)
        B = text.ids_BT.shape[0]
        both = text if negative is None else text.cat(negative)
        T, rows = both.ids_BT.shape[1], both.ids_BT.shape[0]
        ctx = self._start(both, use_cache)
        name = self.config.next_scale_input
        inputs = running_map(name, embedder) if use_cache else Replayed(name, embedder)
        idx_BL = torch.zeros(B, self.num_image_tokens, dtype=torch.long, device=text.ids_BT.device)
        draws = _Draws(B, schedule, temperature, generator, keep_ties, on_sample)
        scale_input, mode, N = None, self.multi_step, len(self.scales)
        for si in range(N):
            strength = cfg_strength(cfg, si, N)
            embeds = self.embed_scale(si, scale_input, B).repeat(rows // B, 1, 1)
            draft = draws(self._step(ctx, embeds, si, T), si, 0, strength)
            for pass_index in range(1, len(schedule) if si >= mode.first_scale else 1):
                again = mode.embeds(self, si, embeds, draft, inputs, embedder)
                logits = self._step(ctx, again, si, T, mode)
                ctx.rollback(again.shape[1])
                draft = draws(logits, si, pass_index, strength)
            idx_BL[:, self.scale_slice(si)] = draft
            scale_input = inputs.commit(draft, si)
        return idx_BL


@dataclass
class _Draws:
    """One sampler call: guide the (doubled) logits, report them, draw under the pass's filters."""

    batch: int
    schedule: Schedule
    temperature: float
    generator: torch.Generator | None
    keep_ties: bool
    on_sample: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None

    def __call__(self, logits_RlK: torch.Tensor, si: int, pass_index: int, strength: float) -> torch.Tensor:
        logits = logits_RlK.float()
        if logits.shape[0] != self.batch:
            logits = guide(logits[: self.batch], logits[self.batch :], strength)
        drawn = sample_codes(logits, self.schedule[pass_index], self.temperature, self.generator, self.keep_ties)
        if self.on_sample is not None:
            self.on_sample(si, pass_index, logits, drawn)
        return drawn


def build_generator(cfg: GeneratorModelConfig, lm_config: dict | None = None) -> NextScaleGenerator:
    """The generator with its LM (see `build_lm`); new parts initialised from cfg.init_std."""
    if not (cfg.scales and cfg.codebook_size and cfg.code_dim):
        raise ValueError("the generator's code space (model.scales, codebook_size, code_dim) is empty: "
                         "attach the image tokenizer's with generation.config.attach_code_space")
    lm = build_lm(cfg, lm_config)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    return NextScaleGenerator(cfg, lm)
