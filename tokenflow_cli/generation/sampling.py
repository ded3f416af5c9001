"""Sampling for next-scale generation: top-k / top-p filters, classifier-free guidance with a
linear ramp over scales, and multi-pass schedules ("1200:0.8,100:0.8,1:0") with a registry of
named presets.

Conventions (the official sampler's, made explicit):

- `top_k <= 0` or `top_k >= K` turns top-k off; `top_p <= 0` or `top_p >= 1` turns top-p off.
  So the official last pass `(1, 0)` is "keep the single most likely code" (greedy).
- Top-k keeps exactly k codes. Ties at the boundary are broken by the lower code index (a
  stable descending sort), so the kept set never depends on the hardware. With `keep_ties`
  (the official rule) it keeps every code >= the k-th largest, so ties may keep more than k.
- Top-p keeps the smallest prefix of the probabilities sorted in descending order (same stable
  order) whose mass is >= p; the most likely code is always kept.
- When both are on, top-k is applied first and top-p then acts on the renormalised survivors.
- Temperature divides the logits before the filters (it must be > 0).
- A pass that keeps one code (k = 1) takes the argmax and draws nothing from the generator, so
  adding a greedy pass never shifts the random stream of later scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def _descending_order(logits_NK: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row by descending logit, ties by ascending index."""
    return torch.sort(logits_NK, dim=-1, descending=True, stable=True).indices


def top_k_keep(logits: torch.Tensor, top_k: int, keep_ties: bool = False) -> torch.Tensor:
    """Bool mask of the codes top-k keeps (exactly k per row, or with `keep_ties` every code
    >= the k-th largest; all when off).

    O(K) beyond `torch.topk`: everything above the k-th largest value, then as many of the codes
    equal to it as there is room for, lowest index first (topk's own tie order is unspecified)."""
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return torch.ones_like(logits, dtype=torch.bool)
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    if keep_ties:
        return logits >= kth
    above = logits > kth
    at = logits == kth
    room = top_k - above.sum(-1, keepdim=True)
    return above | (at & (at.cumsum(-1) <= room))


def top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the smallest descending-probability prefix with mass >= top_p (>= 1 code)."""
    if top_p <= 0 or top_p >= 1:
        return torch.ones_like(logits, dtype=torch.bool)
    order = _descending_order(logits)
    probs_sorted = torch.softmax(logits.float(), dim=-1).gather(-1, order)
    mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
    # A code is needed while the mass of the codes ranked above it is still short of p; the
    # first code has zero mass before it, so it is always kept.
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(logits, dtype=torch.bool)
    return keep.scatter_(-1, order, keep_sorted)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, keep_ties: bool = False) -> torch.Tensor:
    """Logits with everything outside the top-k, then top-p, set to -inf."""
    out = logits.masked_fill(~top_k_keep(logits, top_k, keep_ties), float("-inf"))
    return out.masked_fill(~top_p_keep(out, top_p), float("-inf"))


# --------------------------------------------------------------------------------------------
# Passes, schedules and presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPass:
    """One sampling pass over a scale: top-k and top-p (see the module docstring for "off")."""

    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top-p {self.top_p:g} is not a probability: use a value in (0, 1] (0 turns it off)")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def __str__(self) -> str:
        return f"{self.top_k}:{self.top_p:g}"


Schedule = tuple[SamplingPass, ...]

_PRESETS: dict[str, Schedule] = {}


def register_schedule(name: str, passes: Schedule | str) -> Schedule:
    """Add a named schedule (a tuple of passes or a "k:p,k:p" string) to the registry."""
    schedule = parse_schedule(passes) if isinstance(passes, str) else tuple(passes)
    if not schedule:
        raise ValueError(f"schedule {name!r} has no passes")
    _PRESETS[name] = schedule
    return schedule


def list_schedules() -> dict[str, Schedule]:
    return dict(_PRESETS)


def get_schedule(name_or_spec: str) -> Schedule:
    """A registered preset name, or a "k:p,k:p,..." spec string."""
    if name_or_spec in _PRESETS:
        return _PRESETS[name_or_spec]
    if ":" in name_or_spec:
        return parse_schedule(name_or_spec)
    raise ValueError(f"unknown sampling schedule {name_or_spec!r}; presets: {sorted(_PRESETS)} or 'k:p,k:p'")


def parse_schedule(spec: str) -> Schedule:
    """`"1200:0.8,100:0.8,1:0"` -> three passes; each item is `top_k:top_p`."""
    passes = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"bad pass {item!r} in {spec!r}: expected top_k:top_p, e.g. 1200:0.8")
        try:
            top_k, top_p = int(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"bad pass {item!r} in {spec!r}: top_k is an integer, top_p a number") from None
        try:
            passes.append(SamplingPass(top_k, top_p))
        except ValueError as err:
            raise ValueError(f"bad pass {item!r} in {spec!r}: {err}") from None
    if not passes:
        raise ValueError(f"empty sampling schedule {spec!r}")
    return tuple(passes)


def format_schedule(schedule: Schedule) -> str:
    return ",".join(str(p) for p in schedule)


def schedule_from_pairs(pairs: list[tuple[int | None, float | None]]) -> Schedule:
    """(k1, p1), (k2, p2), ... from CLI options; a pass is present when its k or p is given."""
    passes = []
    for top_k, top_p in pairs:
        if top_k is None and top_p is None:
            continue
        passes.append(SamplingPass(top_k or 0, top_p if top_p is not None else 0.0))
    return tuple(passes)


# The official presets (TokenFlow's t2i sampler).
register_schedule("one-pass", (SamplingPass(600, 0.6),))
register_schedule("two-pass", (SamplingPass(1200, 0.8), SamplingPass(1, 0.0)))
register_schedule("three-pass", (SamplingPass(1200, 0.8), SamplingPass(100, 0.8), SamplingPass(1, 0.0)))


# --------------------------------------------------------------------------------------------
# Guidance and drawing
# --------------------------------------------------------------------------------------------


def cfg_strength(cfg: float, scale_index: int, num_scales: int) -> float:
    """Linear ramp over scales: t = cfg * si / (N - 1) (no guidance on the first scale)."""
    if num_scales <= 1:
        return cfg
    return cfg * scale_index / (num_scales - 1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, strength: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + t) * cond - t * uncond."""
    if strength == 0:
        return cond
    return (1 + strength) * cond - strength * uncond


def sample_codes(
    logits: torch.Tensor,
    sampling_pass: SamplingPass,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    keep_ties: bool = False,
) -> torch.Tensor:
    """Draw one code per row of `logits` (..., K) -> (...) int64 under one pass's filters.

    With top-k on, the draw runs over the k survivors only (in code-index order), so top-p
    sorts k values instead of K: the kept set is exactly `filter_logits`'s. With `keep_ties`
    the candidates are the m largest (m = the most any row keeps) and the ones below a row's
    k-th largest are masked."""
    if sampling_pass.greedy:
        return logits.argmax(dim=-1)  # first index among ties, like top-k's tie rule
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    x_NK = logits.float().reshape(-1, vocab) / temperature
    candidates_Nk = None
    if 0 < sampling_pass.top_k < vocab:
        keep_NK = top_k_keep(x_NK, sampling_pass.top_k, keep_ties)
        width = int(keep_NK.sum(-1).max()) if keep_ties else sampling_pass.top_k
        if keep_ties:
            candidates_Nk = torch.topk(x_NK, width, dim=-1).indices.sort(dim=-1).values
            x_NK = x_NK.gather(-1, candidates_Nk).masked_fill(~keep_NK.gather(-1, candidates_Nk), float("-inf"))
        else:
            candidates_Nk = keep_NK.nonzero()[:, 1].reshape(x_NK.shape[0], width)
            x_NK = x_NK.gather(-1, candidates_Nk)
    x_NK = x_NK.masked_fill(~top_p_keep(x_NK, sampling_pass.top_p), float("-inf"))
    drawn_N1 = torch.multinomial(torch.softmax(x_NK, dim=-1), 1, generator=generator)
    if candidates_Nk is not None:
        drawn_N1 = candidates_Nk.gather(-1, drawn_N1)
    return drawn_N1.reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------
# What `generate` uses when not told: a registry picked by `model.sampler_defaults`
# --------------------------------------------------------------------------------------------

# The official negative prompt (eval/run_llava_samples.py:45 of the official snapshot).
OFFICIAL_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)


@dataclass(frozen=True)
class SamplerDefaults:
    schedule: str  # preset name or "k:p,k:p"
    cfg: float  # guidance at the last scale
    negative_prompt: str  # the unconditional row of CFG
    keep_ties: bool  # top-k keeps every code tied with the k-th


SAMPLER_DEFAULTS: dict[str, SamplerDefaults] = {
    "ours": SamplerDefaults("two-pass", 3.0, "", keep_ties=False),
    # run_t2i.sh: --cfg 7.5 --loop 1 (one pass, (600, 0.6))
    "official": SamplerDefaults("one-pass", 7.5, OFFICIAL_NEGATIVE_PROMPT, keep_ties=True),
}


def sampler_defaults(name: str) -> SamplerDefaults:
    if name not in SAMPLER_DEFAULTS:
        raise ValueError(f"unknown model.sampler_defaults {name!r}; choose one of {sorted(SAMPLER_DEFAULTS)}")
    return SAMPLER_DEFAULTS[name]
