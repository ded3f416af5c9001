"""Multi-step sampling: after scale k is drafted, each further pass of the schedule re-predicts
scale k from a block that sees the draft, and the draft is replaced by the new draw. Two ways to
build that block, a registry (`MULTI_STEP`, picked by `model.multi_step`):

- `refine` (ours, trained): s_k^2 positions after scale k whose inputs are scale k's own input
  embeddings plus a second projector of the draft's code vectors; they see everything scale k
  sees plus scale k itself, RoPE positions right after scale k. Training adds such a block on
  a share of batches (generation/stage.py). Every scale is refined.
- `inplace` (official, official/T2I.md "Sampling"): scale k's own positions are run again with
  their input replaced by the running map that includes the draft (`RunningMap.with_draft`),
  through the same projector; they see what scale k saw (text and scales < k) and themselves,
  not scale k's first run. Untrained, no parameters; from scale 1 on (scale 0 is drawn once).

Either block is cropped from the KV cache after its logits are taken: the first run of scale k
stays cached, its keys and values never depend on scale k's codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenflow_cli.generation.next_scale import Embedder, RunningMap

__all__ = ["MULTI_STEP", "InPlace", "MultiStepMode", "TrainedRefine", "multi_step_mode"]


@dataclass(frozen=True)
class MultiStepMode:
    name: str
    first_scale: int  # scales before it are drawn once, whatever the schedule
    trained: bool  # the model has a draft projector and training adds refine blocks

    def level(self, si: int) -> int:
        """Mask level of the re-prediction block of scale si (generation/context.py block_causal_allowed)."""
        raise NotImplementedError

    def first_position(self, si: int, scale_start: int, scale_len: int) -> int:
        """RoPE position of the block's first token; scale si starts at `scale_start`."""
        raise NotImplementedError

    def embeds(self, model: nn.Module, si: int, scale_embeds_RlH: torch.Tensor, draft_Bl: torch.Tensor,
               inputs: RunningMap, embedder: Embedder) -> torch.Tensor:
        """The block's input embeddings (R, s^2, H) for R = B or 2B (CFG) rows; `model` is the
        NextScaleGenerator (its embed_scale / embed_refine)."""
        raise NotImplementedError


class TrainedRefine(MultiStepMode):
    def level(self, si: int) -> int:
        return 2 * si + 1  # sees levels <= 2 si (scale si included) and its own block

    def first_position(self, si: int, scale_start: int, scale_len: int) -> int:
        return scale_start + scale_len

    def embeds(self, model, si, scale_embeds_RlH, draft_Bl, inputs, embedder):
        rows = scale_embeds_RlH.shape[0] // draft_Bl.shape[0]
        draft_RlC = embedder.lookup_codes(draft_Bl).repeat(rows, 1, 1)
        return model.embed_refine(si, scale_embeds_RlH, draft_RlC)


class InPlace(MultiStepMode):
    def level(self, si: int) -> int:
        return 2 * si - 1  # sees levels <= 2 si - 2 (scales < si) and its own block

    def first_position(self, si: int, scale_start: int, scale_len: int) -> int:
        return scale_start

    def embeds(self, model, si, scale_embeds_RlH, draft_Bl, inputs, embedder):
        rows = scale_embeds_RlH.shape[0] // draft_Bl.shape[0]
        own = model.embed_scale(si, inputs.with_draft(draft_Bl, si), draft_Bl.shape[0])
        return own.repeat(rows, 1, 1)


MULTI_STEP: dict[str, MultiStepMode] = {
    "refine": TrainedRefine("refine", first_scale=0, trained=True),
    "inplace": InPlace("inplace", first_scale=1, trained=False),
}


def multi_step_mode(name: str) -> MultiStepMode:
    if name not in MULTI_STEP:
        raise ValueError(f"unknown model.multi_step {name!r}; choose one of {sorted(MULTI_STEP)}")
    return MULTI_STEP[name]
