"""Stopping on SIGTERM/SIGINT sent to the whole process group (`timeout`, a scheduler, Ctrl-C):
DataLoader workers ignore it, the run finishes its step, checkpoints and exits cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tokenflow_cli.checkpoint import STATE_NAME, WEIGHTS_NAME, load_state, load_train_state
from tokenflow_cli.config import TrainConfig
from tokenflow_cli.train.loop import Stage, TrainData, train
from tokenflow_cli.train.state import complete_checkpoints, latest_checkpoint


def _mark_worker(worker_id: int) -> None:
    torch.utils.data.get_worker_info().dataset.dataset.inner_init_ran = True


class WorkerReport(torch.utils.data.Dataset):
    """Items say, from inside the worker, how it handles the stop signals."""

    inner_init_ran = False

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(3, 4, 4), "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
                "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "inner": self.inner_init_ran}


class WorkerPid(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.randn(3, 4, 4), "pid": os.getpid()}


class TinyStage(Stage):
    kind = "toy"

    def __init__(self, dataset: torch.utils.data.Dataset, worker_init_fn=None, kill_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Conv2d(3, 3, 1)
        self.model_config = {"toy": 1}
        self.dataset, self.worker_init_fn, self.kill_at = dataset, worker_init_fn, kill_at
        self.batches: list[dict] = []

    def train_data(self) -> TrainData:
        return TrainData(self.dataset, num_workers=1, worker_init_fn=self.worker_init_fn)

    def step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        self.batches.append(batch)
        if step == self.kill_at:
            # what a group-wide SIGTERM does when it kills a worker before it could ignore it
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(int(batch["pid"][0]), signal.SIGKILL)
            for _ in range(100):  # torch's SIGCHLD handler raises in here once the worker is gone
                time.sleep(0.05)
        loss = self.wrapped["model"](batch["image"]).pow(2).mean()
        return {"loss": loss}


def tiny_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, lr=0.01, warmup_steps=0, eval_every=0, checkpoint_every=100,
                       log_every=1, seed=0)


def test_workers_ignore_stop_signals_and_still_run_the_stages_init(tmp_path):
    stage = TinyStage(WorkerReport(), worker_init_fn=_mark_worker)
    train(stage, tiny_cfg(2), tmp_path, device="cpu", live=False)
    batch = stage.batches[0]
    assert batch["sigterm"].all() and batch["sigint"].all() and batch["inner"].all()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the main process is untouched


def test_worker_death_after_a_stop_request_is_a_clean_stop(tmp_path, capsys):
    stage = TinyStage(WorkerPid(), kill_at=2)
    result = train(stage, tiny_cfg(1000), tmp_path, device="cpu", live=None)  # prints, no panel
    assert result.stopped_early and result.step == 2  # step 3 never updated the weights
    assert "a data worker died after the stop request" in "".join(capsys.readouterr())
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    assert load_train_state(result.checkpoint / STATE_NAME)["step"] == 2


@pytest.mark.racy  # SIGKILL can land while the worker holds a DataLoader queue lock; the shutdown then hangs
def test_worker_death_without_a_stop_request_still_fails(tmp_path):
    stage = TinyStage(WorkerPid(), kill_at=2)
    stage.step = lambda batch, step, inner=stage.step: (  # the same death, but no SIGTERM to us
        os.kill(int(batch["pid"][0]), signal.SIGKILL), time.sleep(5)) if step == 2 else inner(batch, step)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        train(stage, tiny_cfg(1000), tmp_path, device="cpu", live=False)


def _interrupt_training(command: list[str], run: Path, sig: int, home: Path) -> tuple[int, str]:
    """Start a training command in its own process group (as a shell or `timeout` would), wait
    for its first checkpoint, send `sig` to the whole group, and return (exit code, output)."""
    cmd = [sys.executable, "-m", "tokenflow_cli", *command, "-o", str(run), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "TOKENFLOW_HOME": str(home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not complete_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.communicate()[0]
        os.killpg(proc.pid, sig)  # main process and its DataLoader worker alike
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def _check_interrupted(code: int, output: str, run: Path, sig: int) -> int:
    """Exit 128 + sig, one `error:` line naming the signal and the step, the checkpoint of that
    step on disk and published as the run's weights; returns the step."""
    assert code == 128 + sig, output
    assert "stopping after this step" in output and "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    stopped = re.search(rf"interrupted by {signal.Signals(sig).name} at step (\d+)", lines[0])
    assert stopped and "nothing published" in lines[0], output
    step = int(stopped.group(1))
    assert [s for s, _ in complete_checkpoints(run)][-1] == step
    assert load_train_state(latest_checkpoint(run) / STATE_NAME)["step"] == step
    return step


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from tokenflow_cli.data.shapes import render_shapes_world

    root = tmp_path_factory.mktemp("signals") / "shapes"
    render_shapes_world(root, n=16, seed=0, size=64)
    return root


TRAIN_OVERRIDES = ["data.num_workers=1", "train.batch_size=4", "train.eval_every=0", "train.checkpoint_every=1",
                   "train.log_every=1"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_stops_train_tokenizer_with_a_checkpoint(shapes, tmp_path, sig):
    from tokenflow_cli.tokenizer.model import load_tokenizer

    run = tmp_path / "run"
    overrides = [*TRAIN_OVERRIDES, f"data.train={shapes / 'images'}", "data.val_limit=4",
                 "model.quantizer.codebook_size=64"]
    code, output = _interrupt_training(["train-tokenizer", "tiny", "--steps", "1000",
                                        *[arg for o in overrides for arg in ("--set", o)]], run, sig, tmp_path / "home")
    _check_interrupted(code, output, run, sig)
    published = load_state(run / WEIGHTS_NAME)[0]
    tok = load_tokenizer(str(run), device="cpu")
    assert all(torch.equal(tok.state_dict()[k], v) for k, v in published.items())


def test_ctrl_c_in_train_teacher_keeps_the_checkpoint_and_publishes_no_default(shapes, tmp_path, monkeypatch):
    from tokenflow_cli.cli.app import main
    from tokenflow_cli.teacher.stage import UnfinishedRunError, publish_teacher
    from tokenflow_cli.weights import TINY_TEACHER, default_location

    home, run = tmp_path / "home", tmp_path / "teacher"
    overrides = [arg for o in [*TRAIN_OVERRIDES, f"data.captions={shapes / 'captions.jsonl'}", "data.val_size=4"]
                 for arg in ("--set", o)]
    code, output = _interrupt_training(["train-teacher", "teacher-tiny", "--steps", "1000", "--publish", *overrides],
                                       run, signal.SIGINT, home)
    step = _check_interrupted(code, output, run, signal.SIGINT)
    monkeypatch.setenv("TOKENFLOW_HOME", str(home))
    default = default_location(TINY_TEACHER)
    assert not default.exists() and "published as the default" not in output
    with pytest.raises(UnfinishedRunError, match=f"{step} of 1000 steps"):
        publish_teacher(run, default, steps=1000)
    assert not default.exists()
    # publishing is a separate step after a finished run: one more step finishes a shorter run
    with pytest.raises(SystemExit) as stop:
        main(["train-teacher", "teacher-tiny", "-o", str(run), "--device", "cpu", "--publish",
              "--steps", str(step + 1), *overrides])
    assert stop.value.code == 0 and default.read_bytes() == (run / WEIGHTS_NAME).read_bytes()
