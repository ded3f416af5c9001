"""Learning-rate schedule and model EMA for the generic loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenflow_cli.config import TrainConfig
from tokenflow_cli.train.fsdp import copy_full_into

SCHEDULES = ("constant", "cosine")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on the base lr for optimizer step `step` (0-based): linear warmup from 1/warmup to 1
    over `warmup_steps`, then constant or a half cosine down to `min_lr_ratio` at `steps`."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ModelEma:
    """Exponential moving average of a model's floating-point state (buffers such as usage
    counters are copied, not averaged). Saved as ema.safetensors next to the weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.detach(), 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():  # a full tensor, also where the model is sharded (FSDP)
            copy_full_into(self.shadow[key], value)
