"""The one training loop every stage reuses (tokenizer, generator, LLaVA).

A `Stage` (train/stage.py, which shows how to write one) says WHAT is trained: its model(s),
data, optimizer parameter groups, and a `step` that returns losses. `train()` owns HOW: AdamW
optimizers, warmup + cosine schedule, gradient accumulation, clipping, autocast, optional EMA,
periodic eval, atomic checkpoints and automatic resume, a clean stop on a non-finite loss or on
Ctrl-C / SIGTERM (sent to the whole process group too: data workers ignore it), DDP under
torchrun and rank-0 logging.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from tokenflow_cli import checkpoint as ckpt
from tokenflow_cli.config import TrainConfig, save_resolved, to_dict
from tokenflow_cli.device import autocast, resolve_device, seed_everything
from tokenflow_cli.distributed import barrier, init_distributed
from tokenflow_cli.eval.visual import learning_curves
from tokenflow_cli.train import fsdp, parallel
from tokenflow_cli.train import state as run_state
from tokenflow_cli.train.optim import ModelEma, lr_multiplier
from tokenflow_cli.train.progress import LOG_FILES, TrainProgress
from tokenflow_cli.train.stage import NonFiniteLossError, OptimizerSpec, Stage, TrainData, TrainResult
from tokenflow_cli.train.stream import (
    IgnoreStopSignals,
    ResumableSampler,
    SeededItems,
    is_worker_death,
    stop_watching_workers,
)

__all__ = ["NonFiniteLossError", "OptimizerSpec", "Stage", "TrainData", "TrainResult", "train"]


def train(
    stage: Stage,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    recipe: Any = None,
    device: str | torch.device = "auto",
    resume: bool = True,
    progress: TrainProgress | None = None,
    live: bool | None = True,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train `stage` for `cfg.steps` optimizer steps, resuming from RUN_DIR when it holds a
    checkpoint (and `resume`). `recipe` (any dataclass) is written to RUN_DIR/recipe.yaml.
    `time_limit_s` stops early (with a checkpoint) like Ctrl-C once that much time has passed.
    Raises `NonFiniteLossError` on a NaN/inf loss without writing a checkpoint."""
    loop = _Loop(stage, cfg, Path(run_dir), recipe, device, resume, progress, live)
    loop.deadline = time.perf_counter() + time_limit_s if time_limit_s else None
    try:
        return loop.run()
    finally:
        loop.close()


class _Loop:
    def __init__(self, stage: Stage, cfg: TrainConfig, run_dir: Path, recipe: Any, device: str | torch.device,
                 resume: bool, progress: TrainProgress | None, live: bool | None) -> None:
        dev = resolve_device(str(device))
        self.info = init_distributed(dev.type)
        if self.info.enabled and dev.type == "cuda":
            dev = torch.device("cuda", self.info.local_rank)
        self.stage, self.cfg, self.run_dir, self.device = stage, cfg, run_dir, dev
        fsdp.check_config(cfg)
        self.fsdp = self.info.enabled and cfg.distributed == "fsdp"  # else DDP under torchrun
        self.stop_requested = False  # agreed by all ranks at every step
        self._signalled = False  # this process got SIGINT/SIGTERM (or passed its deadline)
        self._signum = 0  # the signal this process got (0: none, or the deadline)
        self.stop_signal: int | None = None  # agreed by all ranks: the signal that stopped the run
        self.deadline: float | None = None  # perf_counter time after which the run stops early
        self._updating = False  # between the first optimizer step and the EMA update of a step
        self._old_handlers: dict[int, Any] = {}

        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            run_state.remove_partial(run_dir)
            if not resume:
                run_state.clear_run(run_dir, LOG_FILES)
        barrier()
        latest = run_state.latest_checkpoint(run_dir) if resume else None
        self.start_step = 0
        stage.device, stage.dist, stage.run_dir, stage.cfg = dev, self.info, run_dir, cfg
        for module in stage.modules().values():
            if not (self.fsdp and parallel.trainable(module)):  # FSDP moves its shards, never a whole copy
                module.to(dev)
        stage.setup()
        train_state = self._load(latest) if latest else None
        stage.wrapped = {name: parallel.wrap(m, stage, self.info, dev, self.fsdp, cfg.precision)
                         for name, m in stage.modules().items()}
        self.specs = stage.optimizers(cfg)
        self.optimizers = {s.name: self._optimizer(s) for s in self.specs}
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16" and dev.type == "cuda")
        self.ema = ModelEma(stage.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if train_state is not None:
            self._restore(train_state, latest)
        if train_state is None:
            seed_everything(cfg.seed + self.info.rank)
        self.loader = self._loader()
        if train_state is not None:  # last: nothing after this may draw random numbers
            rngs = train_state["rng"]
            run_state.restore_rng(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.progress = None
        if self.info.is_main:
            if recipe is not None:
                save_resolved(recipe, run_dir / "recipe.yaml")
            self.progress = progress or TrainProgress(
                run_dir, cfg.steps, self.start_step if train_state else None, live=live)
            for note in [*stage.notes(), *fsdp.notes(cfg, self.info.world_size, stage.modules().values())]:
                self.progress.message(note)
            if latest:
                self.progress.message(f"resumed from {latest} (step {self.start_step})")

    # ---- setup ---------------------------------------------------------------------------

    def _optimizer(self, spec: OptimizerSpec) -> torch.optim.Optimizer:
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in spec.params]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        for group in groups:
            group.setdefault("lr", spec.lr)
            group["base_lr"] = group["lr"]
        if not any(g["params"] for g in groups):
            raise ValueError(f"optimizer {spec.name!r} has no trainable parameters")
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)

    def _load(self, folder: Path) -> dict[str, Any]:
        # before sharding: every rank loads the full weights (on CPU when FSDP shards them later)
        device = "cpu" if self.fsdp else self.device
        weights, _ = ckpt.load_state(folder / ckpt.WEIGHTS_NAME, device=device)
        self.stage.model.load_state_dict(weights, strict=True)
        state = ckpt.load_train_state(folder / ckpt.STATE_NAME)
        self.stage.load_state_dict(state.get("stage", {}))
        self.start_step = int(state["step"])
        return state

    def _restore(self, state: dict[str, Any], folder: Path) -> None:
        for name, opt in self.optimizers.items():
            if self.fsdp:
                fsdp.load_optimizer_state(self.stage.modules(), opt, state["optimizers"][name])
            else:
                opt.load_state_dict(state["optimizers"][name])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and (folder / run_state.EMA_NAME).is_file():
            device = "cpu" if self.fsdp else self.device  # FSDP: each rank slices its shard
            self.ema.load_state_dict(ckpt.load_state(folder / run_state.EMA_NAME, device=device)[0])

    def _loader(self) -> DataLoader:
        data = self.stage.train_data()
        per_step = self.cfg.batch_size * self.cfg.grad_accum
        sampler = ResumableSampler(len(data.dataset), self.cfg.seed, self.info.rank, self.info.world_size,
                                   start=self.start_step * per_step)
        return DataLoader(
            SeededItems(data.dataset, self.cfg.seed), batch_size=self.cfg.batch_size, sampler=sampler,
            collate_fn=data.collate_fn, num_workers=data.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=data.num_workers > 0, worker_init_fn=IgnoreStopSignals(data.worker_init_fn),
            # own generator: creating the iterator must not draw from the global torch RNG
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, stage = self.cfg, self.stage
        self._install_signal_handlers()
        batches = iter(self.loader)
        for module in stage.modules().values():
            module.train()
        step, images, started = self.start_step, 0, time.perf_counter()
        history: list[dict[str, Any]] = []
        last_eval: dict[str, Any] = {}
        window_start, window_images = started, 0
        latest = run_state.latest_checkpoint(self.run_dir)
        saved_step = self.start_step  # nothing new to save before the first step of this run
        try:  # stopping on a worker death (see _stop_on_worker_death) covers the whole loop
            while step < cfg.steps and not self.stop_requested:
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    self._signalled = True  # agreed across ranks at the end of this step
                losses, n = self._one_step(batches, step)
                step += 1
                images += n
                window_images += n
                stage.after_step(step)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    rate = window_images * self.info.world_size / max(now - window_start, 1e-9)
                    row = self._row(step, losses, rate)
                    window_start, window_images = now, 0
                    if self.progress:
                        self.progress.train_row(row)
                        history.append(row)
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last_eval = self._evaluate(step) or last_eval
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if periodic or step == cfg.steps or self.stop_requested:
                    latest, saved_step = self._save(step), step
        except RuntimeError as err:
            if not self._stop_on_worker_death(err, batches, step):
                raise
            self.stop_signal = self.stop_signal or self._signum or None
            if step != saved_step and not self._updating:
                latest = self._save(step)
        seconds = time.perf_counter() - started
        self._draw_curves()
        return TrainResult(self.run_dir, step, latest, history, last_eval,
                           images * self.info.world_size / max(seconds, 1e-9), seconds,
                           stopped_early=step < cfg.steps,
                           stop_signal=self.stop_signal if step < cfg.steps else None, rank=self.info.rank)

    def _draw_curves(self) -> None:
        """RUN_DIR/curves.png from metrics.jsonl (rank 0); a drawing problem never fails a run."""
        metrics = self.run_dir / "metrics.jsonl"
        if self.info.rank == 0 and metrics.is_file():
            try:
                learning_curves(metrics, self.run_dir / "curves.png")
            except (OSError, ValueError, KeyError) as err:
                if self.progress:
                    self.progress.message(f"curves.png not drawn: {err}")

    def _stop_on_worker_death(self, err: RuntimeError, batches: Any, step: int) -> bool:
        """A DataLoader worker died after a stop request (a group-wide signal that reached it
        before it could ignore it, a SIGKILL): stop as asked instead of crashing. The weights are
        checkpointed unless the error cut an optimizer update short; then the last checkpoint
        stands. Single process only: under DDP the other ranks would wait in a collective."""
        if not (self._signalled and is_worker_death(err)) or self.info.enabled:
            return False
        stop_watching_workers(batches)
        if self.progress:
            kept = ("the last checkpoint stands (the error interrupted an optimizer update)"
                    if self._updating else f"checkpointing step {step}")
            self.progress.message(f"stopping: a data worker died after the stop request ({err}); {kept}")
        return True

    def _one_step(self, batches: Any, step: int) -> tuple[dict[str, float], int]:
        cfg, stage = self.cfg, self.stage
        mult = lr_multiplier(step, cfg)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
        sums: dict[str, torch.Tensor] = {}
        active: set[str] = set()
        n = 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else parallel.no_sync(stage.wrapped.values())
            with sync:
                with autocast(cfg.precision, self.device):
                    losses = stage.step(batch, step)
                keys = [s.loss_key for s in self.specs if s.loss_key in losses]
                if "loss" not in losses:
                    raise KeyError(f"{type(stage).__name__}.step must return a 'loss' entry")
                total = sum(losses[k].float() for k in keys) / cfg.grad_accum
                self.scaler.scale(total).backward()
            active.update(keys)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum
            n += stage.num_samples(batch)
        values = {k: float(v) for k, v in sums.items()}
        self._check_finite(step, values)
        self._updating = True
        for spec in self.specs:
            opt = self.optimizers[spec.name]
            if spec.loss_key in active:
                self.scaler.unscale_(opt)
                if spec.grad_clip > 0:
                    params = [p for g in opt.param_groups for p in g["params"]]
                    norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
                    values[f"grad_norm/{spec.name}" if spec.name != "main" else "grad_norm"] = float(norm)
                self.scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(stage.model)
        self._updating = False
        return values, n

    def _check_finite(self, step: int, values: dict[str, float]) -> None:
        flags = torch.tensor([float(not all(math.isfinite(v) for v in values.values())),
                              float(self._signalled), float(self._signum)], device=self._comm_device())
        if self.info.enabled:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flags[1])
        self.stop_signal = int(flags[2]) or None
        if flags[0]:
            latest = run_state.latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            if self.progress:
                self.progress.log.append({"step": step + 1, "split": "event", "event": "non-finite loss", **values})
            raise NonFiniteLossError(
                f"non-finite loss at step {step + 1} ({shown}); training stopped before updating the "
                f"weights; {kept}. Lower train.lr, raise train.warmup_steps or use precision fp32/bf16."
            )

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _row(self, step: int, losses: dict[str, float], rate: float) -> dict[str, Any]:
        if self.info.enabled:  # log the mean over ranks
            keys = sorted(losses)
            vec = torch.tensor([losses[k] for k in keys], device=self._comm_device())
            dist.all_reduce(vec)
            losses = {k: float(v) / self.info.world_size for k, v in zip(keys, vec)}
        extra = self.stage.metrics(step)
        main_lr = next(iter(self.optimizers.values())).param_groups[0]["lr"]
        eta = (self.cfg.steps - step) * self.cfg.batch_size * self.cfg.grad_accum * self.info.world_size
        return {"step": step, "lr": main_lr, "images_per_s": rate, "eta_s": eta / max(rate, 1e-9),
                **losses, **extra}

    def _evaluate(self, step: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        # FSDP: all ranks gather the weights, so that rank 0 alone can run the model
        gathered = contextlib.ExitStack()
        if self.fsdp:
            gathered.enter_context(fsdp.gathered(self.stage.modules().values()))
            gathered.enter_context(torch.no_grad())
        with gathered:
            if self.info.is_main:
                with run_state.preserved_rng():
                    for module in self.stage.modules().values():
                        module.eval()
                    try:
                        result = {"step": step, **self.stage.evaluate(step)}
                    finally:
                        for module in self.stage.modules().values():
                            module.train()
                if self.progress and len(result) > 1:
                    self.progress.eval_row(result)
        barrier()
        return result if len(result) > 1 else {}

    def _save(self, step: int) -> Path | None:
        rngs: list[Any] = [run_state.capture_rng()]
        if self.info.enabled:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, run_state.capture_rng())
        weights, optimizers, ema = parallel.full_states(self.stage, self.optimizers, self.ema, self.fsdp)
        folder = None
        if self.info.is_main:
            state = {
                "step": step,
                "optimizers": optimizers,
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "samples_per_rank": step * self.cfg.batch_size * self.cfg.grad_accum,
                "world_size": self.info.world_size,
                "stage": self.stage.state_dict(),
            }

            def write(tmp: Path) -> None:
                config = to_dict(self.stage.model_config) if self.stage.model_config is not None else None
                ckpt.save_weights(weights, tmp / ckpt.WEIGHTS_NAME, config, kind=self.stage.kind)
                if ema is not None:
                    ckpt.save_weights(ema, tmp / run_state.EMA_NAME, config, kind=self.stage.kind)
                ckpt.save_train_state(state, tmp / ckpt.STATE_NAME)

            folder = run_state.write_checkpoint(self.run_dir, step, write)
        barrier()
        return folder or run_state.latest_checkpoint(self.run_dir)

    # ---- signals and teardown --------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second: stop at once."""
        if not _in_main_thread():
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._signalled and self._signum:
                raise KeyboardInterrupt
            self._signalled, self._signum = True, signum
            if self.progress:
                self.progress.message("stopping after this step (checkpointing); press Ctrl-C again to abort")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, request_stop)

    def close(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if getattr(self, "progress", None) is not None:
            self.progress.close()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
