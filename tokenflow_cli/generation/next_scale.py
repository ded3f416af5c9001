"""Next-scale inputs: what the positions of scale k >= 1 are given, built from the codes of the
scales before it, one scale at a time (constant work per scale).

Two rules, a registry (`NEXT_SCALE_INPUTS`, picked by `model.next_scale_input`):

- `var` (VAR): every scale's code map is upsampled to the final grid and summed there; the
  input of scale k is that sum over scales < k, downsampled to s_k x s_k. With the image
  tokenizer's own interpolation modes this is exactly `tokenizer.next_scale_inputs`.
- `chained` (official t2i, official/T2I.md "Next-scale inputs"): the running map lives at the
  current scale's resolution, `f = f + codes_k` at s_k, then `f = bicubic(f, s_{k+1})`, which is
  the input of scale k+1.

A `RunningMap` holds one image batch's state: `commit(idx_Bl, k)` adds scale k's codes and
returns scale k+1's input; `with_draft(idx_Bl, k)` is scale k's input with a draft of scale
k's own codes included, at s_k (the official in-place multi-step input), without committing.
`Replayed` rebuilds the map from every committed scale at each call, as the official sampler
does (the recompute-all reference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["NEXT_SCALE_INPUTS", "ChainedMap", "Replayed", "RunningMap", "VarMap", "running_map", "teacher_inputs"]


class Embedder(Protocol):
    scales: tuple[int, ...]
    code_dim: int

    def lookup_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor: ...


def _code_map(embedder: Embedder, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
    """Scale si's codes (B, s*s) -> their code vectors as a map (B, C, s, s)."""
    s = embedder.scales[si]
    return embedder.lookup_codes(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], -1, s, s)


def _tokens(f_BCss: torch.Tensor) -> torch.Tensor:
    """(B, C, s, s) -> (B, s*s, C), row-major positions."""
    return f_BCss.flatten(2).transpose(1, 2)


def _resize(f_BChw: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """Resize, skipping the identity (as the tokenizer's quantizer does)."""
    if f_BChw.shape[-1] == side:
        return f_BChw
    return F.interpolate(f_BChw, size=(side, side), mode=mode)


def _interpolation(embedder: Embedder) -> tuple[str, str]:
    """The image tokenizer's own (up, down) modes (TokenFlowTokenizer.config.quantizer), else VAR's."""
    quantizer = getattr(getattr(embedder, "config", None), "quantizer", None)
    if quantizer is None:
        return "bicubic", "area"
    return quantizer.upsample_mode, quantizer.downsample_mode


class RunningMap(Protocol):
    def commit(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor | None: ...

    def with_draft(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor: ...


class VarMap:
    """VAR's rule: the sum lives at the final grid (B, C, side, side)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.scales = tuple(embedder.scales)
        self.up, self.down = _interpolation(embedder)
        self.f_hat: torch.Tensor | None = None

    def _added(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        up = _resize(_code_map(self.embedder, idx_Bl, si), self.scales[-1], self.up)
        return up if self.f_hat is None else self.f_hat + up

    def commit(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor | None:
        self.f_hat = self._added(idx_Bl, si)
        if si + 1 == len(self.scales):
            return None
        return _tokens(_resize(self.f_hat, self.scales[si + 1], self.down))

    def with_draft(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        return _tokens(_resize(self._added(idx_Bl, si), self.scales[si], self.down))


class ChainedMap:
    """The official rule: `f_hat` is the input map of the next scale, at that scale's side."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.scales = tuple(embedder.scales)
        self.f_hat: torch.Tensor | None = None  # (B, C, s_k, s_k): scale k's input map

    def _added(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        codes = _code_map(self.embedder, idx_Bl, si)
        return codes if self.f_hat is None else self.f_hat + codes

    def commit(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor | None:
        if si + 1 == len(self.scales):
            self.f_hat = self._added(idx_Bl, si)
            return None
        nxt = self.scales[si + 1]
        self.f_hat = F.interpolate(self._added(idx_Bl, si), size=(nxt, nxt), mode="bicubic")
        return _tokens(self.f_hat)

    def with_draft(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        return _tokens(self._added(idx_Bl, si))


NEXT_SCALE_INPUTS: dict[str, Callable[[Embedder], RunningMap]] = {"var": VarMap, "chained": ChainedMap}


def running_map(name: str, embedder: Embedder) -> RunningMap:
    if name not in NEXT_SCALE_INPUTS:
        raise ValueError(f"unknown model.next_scale_input {name!r}; choose one of {sorted(NEXT_SCALE_INPUTS)}")
    return NEXT_SCALE_INPUTS[name](embedder)


class Replayed:
    """A running map rebuilt from scratch from every committed scale at each call: the work the
    official sampler does (it re-encodes all codes for every scale). Same values as the map."""

    def __init__(self, name: str, embedder: Embedder) -> None:
        self.name, self.embedder = name, embedder
        self.committed: list[torch.Tensor] = []

    def _replay(self) -> RunningMap:
        fresh = running_map(self.name, self.embedder)
        for sj, idx_Bl in enumerate(self.committed):
            fresh.commit(idx_Bl, sj)
        return fresh

    def commit(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor | None:
        fresh = self._replay()
        self.committed.append(idx_Bl)
        return fresh.commit(idx_Bl, si)

    def with_draft(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        return self._replay().with_draft(idx_Bl, si)


def teacher_inputs(name: str, embedder: Embedder, idx_BL: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forcing inputs of scales 1..N-1 from ground-truth codes (B, L): [(B, s_k^2, C)]."""
    state, start, inputs = running_map(name, embedder), 0, []
    for si, s in enumerate(embedder.scales[:-1]):
        inputs.append(state.commit(idx_BL[:, start : start + s * s], si))
        start += s * s
    return inputs
