"""Training batches whose content is a pure function of (seed, epoch, step): the basis of exact resume and of
distributed runs that equal a single process.

Every epoch draws one permutation of the training set from ``seed`` and ``epoch``; global batch ``k`` takes
positions ``[k*B, (k+1)*B)`` (the last incomplete batch is dropped) and rank ``r`` of ``W`` takes its contiguous
slice. Augmentation randomness is seeded per batch (in memory) or per sample (streamed), never by the worker or
the process that happens to run it.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from vitlab.data.folder import BadSample, InMemoryImages, SafeImageFolder, collate_skip_bad
from vitlab.data.transforms import BatchAugment, make_mix

log = logging.getLogger(__name__)

_PRIME = 1_000_003


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (independent of PYTHONHASHSEED)."""
    h = 0x5EED
    for p in parts:
        h = (h * _PRIME + int(p) + 1) % (2**63 - 1)
    return h


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 1))
    return torch.randperm(n, generator=g)


def rank_slice(global_batch: int, rank: int, world: int) -> slice:
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {world} processes")
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)


class InMemoryBatches:
    """Batches from an :class:`InMemoryImages`, augmented per global batch by :class:`BatchAugment`."""

    def __init__(self, data: InMemoryImages, augment: BatchAugment, *, seed: int, num_classes: int,
                 mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0) -> None:
        self.data = data
        self.augment = augment
        self.seed = seed
        self.mix = make_mix(num_classes, mixup, cutmix, mix_prob)
        self.mixing = True
        """Set False to stop mixing from the next batch drawn (the engine's ``mix_off_fraction``)."""

    @property
    def num_samples(self) -> int:
        return len(self.data.labels)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_samples // global_batch

    def epoch(self, epoch: int, start_step: int, global_batch: int, rank: int = 0,
              world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[BadSample]]]:
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        part = rank_slice(global_batch, rank, world)
        for k in range(start_step, self.steps_per_epoch(global_batch)):
            idx = perm[k * global_batch:(k + 1) * global_batch]
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, k, 2))
            # Augment the whole global batch on every rank (cheap in memory) so that W processes see exactly the
            # pixels one process would; then keep this rank's slice.
            x = self.augment(self.data.images[idx], g)
            y = self.data.labels[idx]
            if self.mix is not None and self.mixing:
                x, y = self.mix(x, y, g)
            yield x[part], y[part], []


class _EpochBatchSampler(Sampler):
    """Yields this rank's ``(index, sample_seed)`` lists for one epoch, from ``start_step`` on."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int) -> None:
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.part = rank_slice(global_batch, rank, world)
        self.epoch_index, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int) -> None:
        self.epoch_index, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch_index)
        for k in range(self.start, self.n // self.global_batch):
            pos = range(k * self.global_batch, (k + 1) * self.global_batch)[self.part]
            yield [(int(perm[p]), derive_seed(self.seed, self.epoch_index, p, 3)) for p in pos]


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches every process of the terminal's group, workers included; the
    main process decides what it means (the training loop stops at a checkpoint), so a worker must not die of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FolderBatches:
    """Batches decoded and augmented per image by DataLoader workers (datasets too big to hold in memory)."""

    def __init__(self, dataset: SafeImageFolder, *, seed: int, num_classes: int, workers: int = 2,
                 mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0, rank: int = 0, world: int = 1,
                 global_batch: int = 128) -> None:
        self.dataset = dataset
        self.seed, self.rank, self.world, self.global_batch = seed, rank, world, global_batch
        self.sampler = _EpochBatchSampler(len(dataset), global_batch, seed, rank, world)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate_skip_bad, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_sigint)
        self.mix = make_mix(num_classes, mixup, cutmix, mix_prob)
        self.mixing = True

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_samples // global_batch

    def epoch(self, epoch: int, start_step: int, global_batch: int, rank: int = 0,
              world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[BadSample]]]:
        assert (global_batch, rank, world) == (self.global_batch, self.rank, self.world)
        self.sampler.set_epoch(epoch, start_step)
        for k, (x, y, bad) in enumerate(self.loader, start=start_step):
            if self.mix is not None and self.mixing and len(y):
                g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, k, rank, 4))
                x, y = self.mix(x, y, g)
            yield x, y, bad


class _Failure:
    """An exception raised in the producer thread, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch:
    """Iterate ``batches`` while a background thread produces the next ``depth`` items.

    For a GPU: the training step waits for its loss each step, so without this the in-memory augmentation (CPU)
    and the step (GPU) take turns, and the GPU sat idle half of a small model's run (docs/speed.md, "On a GPU").
    ``pin`` copies each tensor into page-locked memory so the step's host-to-device copy can run asynchronously.
    Not for CPU training: the thread would compete with the step for the same cores, and the augmentation seeds
    the process-wide CPU generator (``fork_rng``), which the CPU model's dropout draws from. An exception raised
    by ``batches`` is raised by this iterator at the item where it happened; ``close`` (or leaving a ``with``
    block) stops the thread. ``busy_s`` is the producer's own time, for the loader's throughput.
    """

    def __init__(self, batches: Iterator[tuple], *, depth: int = 2, pin: bool = False) -> None:
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = object()
        self._batches, self._pin = batches, pin
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._produce, name="vitlab-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            it = iter(self._batches)
            while True:
                start = time.perf_counter()
                item = next(it, self._done)
                if item is not self._done and self._pin:
                    item = tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in item)
                self.busy_s += time.perf_counter() - start
                if not self._put(item) or item is self._done:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failure(e))

    def __iter__(self) -> Iterator[tuple]:
        while True:
            item = self._items.get()
            if item is self._done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        """Whether the producer thread is still alive (False once ``close`` has returned)."""
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
