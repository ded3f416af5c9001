"""The generic training loop on a toy stage: resume == uninterrupted, non-finite stop, kill-safe
checkpoints, schedule, accumulation, several optimizers, EMA."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tokenflow_cli.checkpoint import WEIGHTS_NAME, load_state
from tokenflow_cli.config import TrainConfig
from tokenflow_cli.train.loop import NonFiniteLossError, OptimizerSpec, Stage, TrainData, train
from tokenflow_cli.train.optim import lr_multiplier
from tokenflow_cli.train.state import complete_checkpoints, latest_checkpoint


class NoisyImages(torch.utils.data.Dataset):
    """Fixed images plus a random flip and noise drawn from the torch RNG (like augmentation)."""

    def __init__(self, n: int = 10) -> None:
        self.images = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        img = self.images[index]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return {"image": img + 0.05 * torch.randn_like(img), "index": index}


class ToyStage(Stage):
    """Auto-encoder with dropout (uses the training RNG) and an optional critic optimizer."""

    kind = "toy"

    def __init__(self, critic_start: int | None = None, crash_at: int | None = None,
                 nan_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.2), nn.ReLU(),
                                   nn.Conv2d(8, 3, 3, padding=1))
        self.model_config = {"toy": 1}
        self.critic = nn.Linear(3, 1) if critic_start is not None else None
        self.critic_start, self.crash_at, self.nan_at = critic_start, crash_at, nan_at
        self.after_calls = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"critic": self.critic} if self.critic is not None else {})}

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        specs = super().optimizers(cfg)
        if self.critic is not None:
            specs.append(OptimizerSpec("critic", self.critic.parameters(), lr=0.1, loss_key="critic_loss"))
        return specs

    def train_data(self) -> TrainData:
        return TrainData(NoisyImages())

    def step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        img = batch["image"].to(self.device)
        rec = self.wrapped["model"](img)
        loss = (rec - img).pow(2).mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        out = {"loss": loss, "l2": loss}
        if self.critic is not None and step >= self.critic_start:
            out["critic_loss"] = self.wrapped["critic"](rec.detach().mean((2, 3))).mean()
        return out

    def after_step(self, step: int) -> None:
        self.after_calls += 1


def toy_cfg(**changes) -> TrainConfig:
    base = TrainConfig(steps=6, batch_size=4, lr=0.01, warmup_steps=2, schedule="cosine", eval_every=0,
                       checkpoint_every=2, log_every=1, seed=3)
    return dataclasses.replace(base, **changes)


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history]


def test_resume_after_crash_matches_uninterrupted(tmp_path):
    full = train(ToyStage(), toy_cfg(), tmp_path / "full", device="cpu", live=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(ToyStage(crash_at=4), toy_cfg(), tmp_path / "cut", device="cpu", live=False)
    assert [s for s, _ in complete_checkpoints(tmp_path / "cut")] == [2, 4]
    resumed = train(ToyStage(), toy_cfg(), tmp_path / "cut", device="cpu", live=False)
    assert [row["step"] for row in resumed.history] == [5, 6]
    assert losses(resumed) == losses(full)[4:]  # bit-identical: data order, augmentation, dropout RNG
    a = load_state(tmp_path / "full" / WEIGHTS_NAME)[0]
    b = load_state(tmp_path / "cut" / WEIGHTS_NAME)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]  # the crashed step 5 row is not doubled


def test_no_resume_starts_fresh(tmp_path):
    train(ToyStage(), toy_cfg(steps=2), tmp_path, device="cpu", live=False)
    again = train(ToyStage(), toy_cfg(steps=2), tmp_path, device="cpu", live=False, resume=False)
    assert [row["step"] for row in again.history] == [1, 2]


def test_checkpoint_every_zero_checkpoints_only_at_the_end(tmp_path):
    train(ToyStage(), toy_cfg(steps=3, checkpoint_every=0), tmp_path, device="cpu", live=False)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*last good checkpoint .*step-00000002"):
        train(ToyStage(nan_at=3), toy_cfg(), tmp_path, device="cpu", live=False)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    kept = load_state(tmp_path / WEIGHTS_NAME)[0]
    assert all(torch.isfinite(v).all() for v in kept.values())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "non-finite loss"


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import tokenflow_cli.checkpoint as ckpt
    from test_train_loop import ToyStage, toy_cfg
    from tokenflow_cli.train.loop import train

    real = ckpt.save_train_state
    calls = []

    def dying_save(state, path):
        calls.append(path)
        if len(calls) == 2:  # second checkpoint: half a file, then the process is killed
            with open(path, "wb") as fh:
                fh.write(b"partial")
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(state, path)

    ckpt.save_train_state = dying_save
    train(ToyStage(), toy_cfg(), {run!r}, device="cpu", live=False)
""")


def test_killed_run_leaves_no_half_written_checkpoint(tmp_path):
    run = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    assert [s for s, _ in complete_checkpoints(run)] == [2]  # the killed step-4 folder never appeared
    weights, meta = load_state(run / WEIGHTS_NAME)  # the published weights are the step-2 ones
    step2 = load_state(latest_checkpoint(run) / WEIGHTS_NAME)[0]
    assert meta["format"] == "tokenflow-cli/toy" and all(torch.equal(weights[k], step2[k]) for k in weights)
    resumed = train(ToyStage(), toy_cfg(), run, device="cpu", live=False)
    assert resumed.step == 6 and not list((run / "checkpoints").glob(".tmp-*"))


def test_warmup_then_cosine_schedule():
    cfg = toy_cfg(steps=12, warmup_steps=2, min_lr_ratio=0.1)
    mults = [lr_multiplier(s, cfg) for s in range(12)]
    assert mults[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(mults[2:], mults[3:]))  # monotone decay after warmup
    assert mults[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 10)).item()))
    assert lr_multiplier(0, toy_cfg(schedule="constant", warmup_steps=0)) == 1.0


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    def weights(cfg, name):
        stage = ToyStage()
        stage.model[1].p = 0.0  # no dropout: the two runs draw the RNG differently
        train(stage, cfg, tmp_path / name, device="cpu", live=False)
        return load_state(tmp_path / name / WEIGHTS_NAME)[0]

    big = weights(toy_cfg(steps=1, batch_size=8, grad_accum=1), "big")
    small = weights(toy_cfg(steps=1, batch_size=4, grad_accum=2), "small")
    assert all(torch.allclose(big[k], small[k], atol=1e-6) for k in big)


def test_second_optimizer_waits_for_its_loss_and_trains_only_its_module(tmp_path):
    stage = ToyStage(critic_start=3)
    before = {k: v.clone() for k, v in stage.critic.state_dict().items()}
    result = train(stage, toy_cfg(steps=3), tmp_path / "early", device="cpu", live=False)
    assert all(torch.equal(before[k], v) for k, v in stage.critic.state_dict().items())
    assert "critic_loss" not in result.history[-1]
    result = train(stage, toy_cfg(steps=5), tmp_path / "early", device="cpu", live=False)
    assert not torch.equal(before["weight"], stage.critic.weight.detach())
    assert "critic_loss" in result.history[-1] and "grad_norm" in result.history[-1]
    assert stage.after_calls == 5


def test_ema_weights_are_written_and_lag_the_model(tmp_path):
    train(ToyStage(), toy_cfg(steps=4, ema_decay=0.9), tmp_path, device="cpu", live=False)
    raw = load_state(tmp_path / WEIGHTS_NAME)[0]
    ema, meta = load_state(tmp_path / "ema.safetensors")
    assert meta["format"] == "tokenflow-cli/toy"
    assert not torch.equal(raw["0.weight"], ema["0.weight"])
    assert (tmp_path / "checkpoints" / "step-00000004" / "ema.safetensors").is_file()


def test_metrics_csv_gains_columns_when_new_losses_appear(tmp_path):
    train(ToyStage(critic_start=2), toy_cfg(steps=3), tmp_path, device="cpu", live=False)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "critic_loss" in lines[0].split(",") and len(lines) == 4
    assert (tmp_path / "recipe.yaml").exists() is False  # no recipe given, none written


def test_time_limit_stops_early_with_a_checkpoint(tmp_path):
    result = train(ToyStage(), toy_cfg(steps=50), tmp_path, device="cpu", live=False, time_limit_s=1e-9)
    assert result.stopped_early and result.step == 1
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]


def test_live_panel_shows_losses_and_usage_per_scale(tmp_path):
    import io

    from rich.console import Console

    from tokenflow_cli.train.progress import TrainProgress

    buffer = io.StringIO()
    progress = TrainProgress(tmp_path, 10, console=Console(file=buffer, force_terminal=True, width=120))
    progress.train_row({"step": 3, "lr": 1e-4, "images_per_s": 12.5, "eta_s": 61.0, "loss": 0.5, "l2": 0.1,
                        "usage": 0.5, "usage@1": 1.0, "usage@4": 0.25, "ppl": 40.0, "ppl@1": 1.0, "ppl@4": 9.0})
    progress.close()
    shown = buffer.getvalue()
    for text in ("3/10", "12.5", "01:01", "4x4", "25%", "perplexity", "loss"):
        assert text in shown, text
    assert (tmp_path / "metrics.csv").read_text().startswith("step,lr,images_per_s")
