"""How the loop's modules run across ranks: as they are (one process), DDP, or FSDP2.

Under torchrun each trainable module of a stage is wrapped in DDP or, with
`train.distributed: fsdp`, sharded in place (train/fsdp.py). The loop asks this module for the
wrapping, for pausing gradient sync during accumulation, and for the full states a checkpoint
stores, so that it never branches on the strategy for these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tokenflow_cli.distributed import DistInfo
from tokenflow_cli.train import fsdp
from tokenflow_cli.train.optim import ModelEma
from tokenflow_cli.train.stage import Stage

__all__ = ["enable_activation_checkpointing", "full_states", "no_sync", "trainable", "wrap"]


def trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def wrap(module: nn.Module, stage: Stage, info: DistInfo, device: torch.device, use_fsdp: bool,
         precision: str) -> nn.Module:
    """Under torchrun: DDP, or with train.distributed=fsdp sharded in place (train/fsdp.py)."""
    if not info.enabled or not trainable(module):
        return module
    if use_fsdp:
        fsdp.shard(module, stage.fsdp_units(), device, info.world_size, precision)
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=stage.find_unused_parameters)


def no_sync(wrapped: Iterable[nn.Module]) -> contextlib.ExitStack:
    """Gradient accumulation: keep the gradients of the micro-batches before the last local
    (no DDP all-reduce, no FSDP reduce-scatter)."""
    modules = list(wrapped)
    stack = contextlib.ExitStack()
    stack.enter_context(fsdp.gradient_sync_off(modules))
    for module in modules:
        if isinstance(module, DistributedDataParallel):
            stack.enter_context(module.no_sync())
    return stack


def full_states(stage: Stage, optimizers: dict[str, torch.optim.Optimizer], ema: ModelEma | None,
                use_fsdp: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """Model weights, optimizer states and EMA weights as one process holds them; under
    FSDP gathered from the shards (a collective: every rank calls it; rank 0 gets them)."""
    ema_state = ema.state_dict() if ema is not None else None
    if use_fsdp:
        return fsdp.full_states(stage.model, stage.modules(), optimizers, ema_state)
    return stage.model.state_dict(), {n: o.state_dict() for n, o in optimizers.items()}, ema_state


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """transformers >= 5.24 renamed `gradient_checkpointing_enable` (now deprecated)."""
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable()
