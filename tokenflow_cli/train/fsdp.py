"""Fully sharded data parallel (`train.distributed: fsdp`) for the generic loop.

DDP keeps a full copy of the weights, gradients and AdamW moments on every GPU: 16 bytes per
parameter in fp32, 112 GB for the 7B generator LM, so it does not fit. FSDP (torch's FSDP2,
`torch.distributed.fsdp.fully_shard`) keeps 1/W of each on each of W ranks and all-gathers a
unit's weights just for its forward and backward. A stage names its units with
`Stage.fsdp_units()` (the LLM's decoder layers, see `transformer_blocks`); every module in
`Stage.modules()` with trainable parameters is sharded as the root unit around them. Frozen
helpers outside `modules()` (the image tokenizer, feature sources, a teacher) stay whole.

Checkpoints keep the single-process format: full state dicts are gathered to rank 0 (which
writes them), and the optimizer state is re-keyed from parameter names to the indices of
`Optimizer.state_dict()`, so a run can resume under DDP, FSDP or in one process alike.

Runs on CPU with gloo as well as on GPU with nccl (torch >= 2.6). Every function here is a
collective unless it says otherwise: all ranks call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, distribute_tensor

from tokenflow_cli.config import TrainConfig

DISTRIBUTED_CHOICES = ("ddp", "fsdp")


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError for a `train.distributed` (and precision) the loop cannot run; local."""
    if cfg.distributed not in DISTRIBUTED_CHOICES:
        raise ValueError(f"train.distributed must be one of {DISTRIBUTED_CHOICES}, got {cfg.distributed!r}")
    if cfg.distributed == "fsdp" and cfg.precision == "fp16":
        raise ValueError("train.distributed=fsdp does not support precision fp16 (its loss scaler does not "
                         "see sharded gradients); use train.precision=bf16 or fp32")


def notes(cfg: TrainConfig, world_size: int, modules: Iterable[nn.Module]) -> list[str]:
    """What the run prints once about sharding (after `shard`); local."""
    if cfg.distributed != "fsdp":
        return []
    if world_size <= 1:
        return ["train.distributed=fsdp: one process, nothing to shard (it applies under torchrun)"]
    roots = [m for m in modules if is_sharded(m)]
    return [f"FSDP: {len(_units(roots)) - len(roots)} units + {len(roots)} root(s) sharded over {world_size} ranks"]


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise RuntimeError(
            f"train.distributed=fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this torch "
            f"{torch.__version__} lacks it: use train.distributed=ddp") from None
    return fully_shard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """A transformers model's decoder layers (the classes it lists in `_no_split_modules`): the
    units FSDP all-gathers one at a time; local."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was sharded by `shard` (its parameters are DTensor shards); local."""

    return isinstance(module, FSDPModule)


def shard(module: nn.Module, units: Iterable[nn.Module], device: torch.device, world_size: int,
          precision: str) -> int:
    """Shard `module` in place: each of `units` inside it becomes its own unit, so do the small
    modules that `dtype_units` splits off, and the rest is the root unit. Parameters move to
    `device` as they are sharded. Returns the number of inner units."""

    fully_shard = _fully_shard()
    _copy_from_rank0(module, device)
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy()
    if precision == "bf16" and device.type == "cuda":  # gather bf16 weights, reduce gradients in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    inside = {id(m) for m in module.modules()}
    inner = [u for u in units if id(u) in inside and u is not module]
    inner += dtype_units(module, inner)
    for unit in inner:  # freed after its forward, gathered again for its backward
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    # the root's few parameters (embeddings, heads) stay gathered until the backward is done
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return len(inner)


def dtype_units(module: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """FSDP needs one dtype for the trainable parameters of a unit, but a bf16 LM under fp32 new
    parts (projectors, heads) mixes two in the root. The modules outside `units` that directly
    own trainable parameters of another dtype than the root's own (or, when the root owns none,
    the most common dtype) become units of their own, innermost first; local."""
    taken = {id(m) for u in units for m in u.modules()}
    owners = [m for m in module.modules() if id(m) not in taken]
    own = {id(m): [p for p in m.parameters(recurse=False) if p.requires_grad] for m in owners}
    counts: dict[torch.dtype, int] = {}
    for p in (p for m in owners for p in own[id(m)]):
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) < 2:
        return []
    root_dtype = own[id(module)][0].dtype if own[id(module)] else max(counts, key=counts.get)
    split = [m for m in owners if m is not module and any(p.dtype != root_dtype for p in own[id(m)])]
    return split[::-1]  # modules() lists parents first; FSDP wants children sharded first


@torch.no_grad()
def _copy_from_rank0(module: nn.Module, device: torch.device) -> None:
    """Every rank starts from rank 0's weights (what DDP does on wrapping): FSDP keeps each rank's
    own slice, so ranks that initialised differently would otherwise mix into one model."""

    for tensor in [*module.parameters(), *module.buffers()]:
        on_device = tensor.detach().to(device)  # nccl sends only GPU tensors; one at a time
        dist.broadcast(on_device, src=0)
        tensor.copy_(on_device)


def _units(modules: Iterable[nn.Module]) -> list[nn.Module]:
    return [m for root in modules for m in root.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gradient_sync_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Gradient accumulation: keep this micro-batch's gradients local (unsharded); local."""
    sharded = [m for m in modules if is_sharded(m)]
    for module in sharded:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(True)


@contextmanager
def gathered(modules: Iterable[nn.Module]) -> Iterator[None]:
    """All ranks gather the full weights of `modules` on entry (the collective part); inside,
    forwards run without communication, so rank 0 alone may evaluate or sample. Exit is local:
    each rank drops the gathered copy and restores resharding after forward."""
    units = _units(modules)
    roots = {id(m) for m in modules}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)


def _options(**kwargs: bool) -> Any:
    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU on rank 0 (gathered one tensor at a time), {} elsewhere."""

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors (an EMA shadow of a sharded model) made whole on CPU (all ranks)."""

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in state.items()}


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write a whole tensor into `target`, which may be this rank's shard of it; local."""

    if isinstance(target, DTensor):  # every rank holds `full`: each slices its own shard
        full = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    target.copy_(full)


def _param_names(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> list[str]:
    """Names (as torch.distributed.checkpoint spells them) of the optimizer's parameters in
    `Optimizer.state_dict()` index order; local."""
    names = {id(p): n for n, p in nn.ModuleDict(modules).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` as one process would write it (full moments, integer keys) on
    rank 0, {} elsewhere. `modules`: every module owning the optimizer's parameters, by name."""

    named = get_optimizer_state_dict(nn.ModuleDict(modules), optimizer, options=_options(cpu_offload=True))
    if not named:
        return {}
    order = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def full_states(model: nn.Module, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                ema: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """(model weights, {name: optimizer state}, EMA weights or None) gathered for a checkpoint."""
    states = {name: full_optimizer_state(modules, opt) for name, opt in optimizers.items()}
    return full_model_state(model), states, full_tensors(ema) if ema is not None else None


def load_optimizer_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Load a full `Optimizer.state_dict()` (every rank holds it) into a sharded optimizer."""

    names = _param_names(modules, optimizer)
    groups = state["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(names):
        raise ValueError(f"checkpoint optimizer has {sum(len(g['params']) for g in groups)} parameters, "
                         f"this run {len(names)}: was it saved by another stage or model?")
    named = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups],
    }
    set_optimizer_state_dict(nn.ModuleDict(modules), optimizer, named, options=_options())
