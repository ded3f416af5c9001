"""A resumable, distributed, endless stream of training items.

Resuming a run must see exactly the batches the uninterrupted run would have seen, with the
same augmentations. So the order is a pure function of (seed, epoch, rank) and an item's random
crop/flip a pure function of (seed, epoch, index), whatever the DataLoader workers or the point
where the run was stopped.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torch.utils.data._utils import signal_handling


class ResumableSampler(Sampler):
    """Endless (epoch, index) pairs, starting after `start` items of this rank's stream.

    Each epoch is torch's `DistributedSampler` permutation for (seed, epoch): rank r takes every
    W-th item (padded so all ranks get the same count), so the stream is the DDP-standard one.
    """

    def __init__(
        self, num_items: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0, shuffle: bool = True
    ) -> None:
        if num_items <= 0:
            raise ValueError("the training set is empty")
        self.epochs = DistributedSampler(
            range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.per_epoch = self.epochs.num_samples
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = divmod(self.start, self.per_epoch)
        while True:
            self.epochs.set_epoch(epoch)
            for index in list(self.epochs)[position:]:
                yield epoch, index
            epoch, position = epoch + 1, 0


class SeededItems(Dataset):
    """Wraps a map-style dataset: item (epoch, index) is fetched under a torch seed derived from
    (seed, epoch, index), inside a forked RNG so the training RNG is untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # a fixed odd-multiplier mix: distinct, well spread seeds per (seed, epoch, index)
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 2_654_435_761 + index) % 2**63)
            return self.dataset[index]


class IgnoreStopSignals:
    """A DataLoader `worker_init_fn`: the worker ignores SIGINT and SIGTERM, then runs `then`.

    Ctrl-C, `timeout` and cluster schedulers signal the whole process group, workers included.
    Left alone a worker dies of it (torch's worker SIGTERM handler re-raises it; SIGINT ends the
    worker loop) and the main process, busy finishing its step and checkpointing, crashes on the
    dead worker. The main process owns the stop and shuts its workers down itself (a worker also
    exits on its own once its parent is gone). A class, not a closure, so it pickles for spawn.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def is_worker_death(err: BaseException) -> bool:
    """torch's errors for a DataLoader worker that died (killed by a signal, or exited)."""
    return isinstance(err, RuntimeError) and str(err).startswith("DataLoader worker (pid")


def stop_watching_workers(batches: Any) -> None:
    """torch's SIGCHLD handler raises for every dead worker of an iterator it watches, anywhere
    in the main thread: after the first death is handled, a second must not interrupt the
    checkpoint. torch has no public call for this; the iterator's own shutdown (when the loader
    is dropped) then skips the watch list and stops the surviving workers."""

    if getattr(batches, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
