"""What a training stage supplies to the generic loop (`loop.train`).

A `Stage` says WHAT is trained: its model(s), data, optimizer parameter groups, and a `step`
that returns losses. `train()` owns HOW: AdamW optimizers, warmup + cosine schedule, gradient
accumulation, clipping, autocast, optional EMA, periodic eval, atomic checkpoints and automatic
resume, a clean stop on a non-finite loss, DDP under torchrun and rank-0 logging.

Writing a stage (see `tokenizer.stage.TokenizerStage` for a full one)::

    class MyStage(Stage):
        kind = "generator"                          # checkpoint format "tokenflow-cli/generator"

        def __init__(self, recipe):
            self.model = build_generator(recipe.model)  # saved as RUN_DIR/model.safetensors
            self.model_config = recipe.model            # stored in its metadata

        def train_data(self) -> TrainData:
            return TrainData(MyDataset(...), collate_fn=my_collate)

        def step(self, batch, step):
            out = self.wrapped["model"](batch["x"].to(self.device))  # DDP-wrapped under torchrun
            return {"loss": out.loss, "nll": out.nll}

    result = train(MyStage(recipe), recipe.train, run_dir, recipe=recipe)

Several optimizers: `optimizers()` returns one `OptimizerSpec` per optimizer, each naming the
entry of `step()`'s dict that trains it (`loss_key`). The loop back-propagates the sum of those
entries once, so a stage must keep each loss away from the other optimizers' parameters: the
tokenizer's discriminator sees `recon.detach()` for its own loss, and the generator's GAN term
goes through the discriminator under `losses.frozen(...)`. An optimizer whose key is missing
from a step's dict does not step (the discriminator before `gan_start_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tokenflow_cli.config import TrainConfig
from tokenflow_cli.distributed import DistInfo


@dataclass
class OptimizerSpec:
    """One AdamW optimizer. `params` are tensors or torch param-group dicts (a group may carry
    its own "lr"; the schedule scales every group's base lr by the same factor)."""

    name: str  # key in train_state.pt ("main", "discriminator", ...)
    params: Iterable[Any]
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm of these parameters; 0 = off
    loss_key: str = "loss"  # the entry of step()'s dict that trains these parameters


@dataclass
class TrainData:
    dataset: Dataset  # map-style; items are fetched under a per-(epoch, index) seed
    collate_fn: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0
    # runs in each DataLoader worker after the loop's own init (which makes workers ignore
    # SIGINT/SIGTERM); must be picklable where workers are spawned
    worker_init_fn: Callable[[int], None] | None = None


class Stage:
    """Base class of a training stage. Subclasses set `model` (and `model_config`) and implement
    `train_data` and `step`; the other hooks have working defaults.

    Before the first step the loop sets `device`, `dist` (rank info), `run_dir`, `cfg` and
    `wrapped` (name -> the module to call in `step`: DDP-wrapped under torchrun, else the
    module itself, sharded in place with `train.distributed: fsdp`), then calls `setup()`.
    """

    kind: str = "model"  # checkpoint format tokenflow-cli/<kind>
    model: nn.Module  # saved as model.safetensors, EMA'd, wrapped as wrapped["model"]
    model_config: Any = None  # dataclass stored in the checkpoint metadata
    find_unused_parameters: bool = False  # DDP: some trainable parameters skip some steps

    device: torch.device
    dist: DistInfo
    run_dir: Path
    cfg: TrainConfig
    wrapped: dict[str, nn.Module]

    def modules(self) -> dict[str, nn.Module]:
        """Every module with trainable parameters, by name ("model" plus e.g. "discriminator")."""
        return {"model": self.model}

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules of `modules()` that FSDP shards as units of their own (gathered one at a
        time; usually the LLM's decoder layers, `fsdp.transformer_blocks(lm)`). Each module of
        `modules()` with trainable parameters is the root unit around them."""
        return []

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [OptimizerSpec("main", params, cfg.lr, cfg.betas, cfg.weight_decay, cfg.grad_clip)]

    def setup(self) -> None:
        """After device/DDP binding, before resume: build frozen helpers (teacher, LPIPS)."""

    def train_data(self) -> TrainData:
        raise NotImplementedError

    def step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Forward one micro-batch (under autocast) and return losses; "loss" is required."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After the optimizers stepped (all ranks); `step` counts finished steps."""

    def metrics(self, step: int) -> dict[str, float]:
        """Extra figures for a log row (all ranks call it; it may all-reduce)."""
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        """Periodic evaluation on rank 0 (random generators are restored afterwards)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra training state (tensors and plain containers) saved in train_state.pt."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def notes(self) -> list[str]:
        """Lines the run prints once at the start (e.g. which parts are randomly initialised)."""
        return []

    def num_samples(self, batch: Any) -> int:
        """Samples in a micro-batch, for images/s."""
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
            return batch["image"].shape[0]
        return self.cfg.batch_size


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the weights on disk are the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # steps completed
    checkpoint: Path | None  # the newest complete checkpoint folder
    history: list[dict[str, Any]] = field(default_factory=list)  # rank 0's logged train rows
    last_eval: dict[str, Any] = field(default_factory=dict)
    images_per_s: float = 0.0  # over the steps this process ran, all ranks together
    seconds: float = 0.0
    stopped_early: bool = False  # stopped by Ctrl-C / SIGTERM or the time limit (a checkpoint was written)
    stop_signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped it; None for a time limit

    @property
    def finished(self) -> bool:
        """Ran every step of the recipe (not stopped by a signal or a time limit)."""
        return not self.stopped_early
    rank: int = 0  # under torchrun only rank 0 reports
