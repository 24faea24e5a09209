"""A run's data: the training folder checked before anything is written, its fingerprint (what a resumed run must
find again), the training batches (decoded once into memory, or streamed by DataLoader workers), the validation
batches, and the stream of batches from any step on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from vitlab.data.folder import (BadSample, InMemoryImages, SafeImageFolder, empty_classes, estimate_bytes,
                                load_in_memory, scan, split_dirs)
from vitlab.data.loaders import FolderBatches, InMemoryBatches, Prefetch
from vitlab.data.transforms import BatchAugment, normalize_uint8, resolve_normalize, train_transform
from vitlab.train.config import TrainConfig
from vitlab.train.distributed import Dist
from vitlab.train.evaluate import folder_eval_loader


@dataclass
class TrainingFolder:
    """A checked training folder: ``DIR/train`` (and ``DIR/val`` or ``DIR/test``), its classes and image files."""

    root: Path
    train_dir: Path
    val_dir: Path | None
    classes: list[str]
    files: int

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the training data of a run (recorded in its checkpoint, compared on resume)."""
        return {"classes": self.classes, "files": self.files}


def check_training_folder(config: TrainConfig, data_dir: str | Path) -> TrainingFolder:
    """Scan ``data_dir`` and refuse what cannot train a classifier: fewer than two classes, a class folder without
    images, a head smaller than the number of classes. Reads only."""
    train_dir, val_dir = split_dirs(data_dir)
    samples, classes = scan(train_dir)
    if len(classes) < 2:
        raise ValueError(f"{train_dir}: one class folder ({classes[0]}); a classifier needs at least two classes")
    empty = empty_classes(samples, classes)
    if empty:
        raise ValueError(f"{train_dir}: class folder(s) without images: {', '.join(empty)}")
    if config.num_classes is not None and config.num_classes < len(classes):
        raise ValueError(f"num_classes={config.num_classes} is fewer than the {len(classes)} class folders of "
                         f"{train_dir}")
    return TrainingFolder(Path(data_dir), train_dir, val_dir, classes, len(samples))


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the training data recorded in a checkpoint differs from the data given now (empty when it does not)."""
    out = []
    if saved["classes"] != current["classes"]:
        out.append(f"classes: checkpoint {len(saved['classes'])} ({', '.join(saved['classes'][:5])}"
                   f"{', ...' if len(saved['classes']) > 5 else ''}) vs now {len(current['classes'])} "
                   f"({', '.join(current['classes'][:5])}{', ...' if len(current['classes']) > 5 else ''})")
    if saved["files"] != current["files"]:
        out.append(f"image files: checkpoint {saved['files']} vs now {current['files']}")
    return out


@dataclass
class RunData:
    train: InMemoryBatches | FolderBatches
    val: Any  # an iterable of (x, y[, bad]) batches, or None
    classes: list[str]
    bad: list[BadSample]  # unreadable files found while decoding (in memory: all of them, up front)
    in_memory: bool
    train_bad: list[BadSample] = field(default_factory=list)  # those of the training split


def batch_augment(config: TrainConfig) -> BatchAugment:
    """The config's training augmentation for in-memory uint8 batches (also what the benchmarks time)."""
    return BatchAugment(config.image_size, crop=config.crop, crop_scale=config.crop_scale, crop_pad=config.crop_pad,
                        hflip=config.hflip, randaugment_n=config.randaugment_n, randaugment_m=config.randaugment_m,
                        randaugment_group=config.randaugment_group, normalize=resolve_normalize(config.normalize))


def image_transform(config: TrainConfig):
    """The config's per-image training transform (streamed datasets, DataLoader workers)."""
    return train_transform(config.image_size, crop=config.crop, crop_scale=config.crop_scale,
                           crop_pad=config.crop_pad, hflip=config.hflip, randaugment_n=config.randaugment_n,
                           randaugment_m=config.randaugment_m, normalize=resolve_normalize(config.normalize))


def build_data(config: TrainConfig, folder: TrainingFolder | str | Path, d: Dist, progress: bool) -> RunData:
    """The training and validation batches of ``folder`` (a data root is checked first): in memory when
    ``in_memory`` says so (``auto``: when the decoded images fit ``in_memory_max_mb``), else streamed."""
    if not isinstance(folder, TrainingFolder):
        folder = check_training_folder(config, folder)
    norm = resolve_normalize(config.normalize)
    in_memory = bool(config.in_memory) if config.in_memory != "auto" else \
        estimate_bytes(folder.files, config.image_size) <= config.in_memory_max_mb * 2**20
    num_classes = config.num_classes or len(folder.classes)
    mix = dict(mixup=config.mixup, cutmix=config.cutmix, mix_prob=config.mix_prob)
    classes, val_dir = folder.classes, folder.val_dir
    if in_memory:
        data = load_in_memory(folder.train_dir, config.image_size, strict=config.strict, progress=progress)
        train = InMemoryBatches(data, batch_augment(config), seed=config.seed, num_classes=num_classes, **mix)
        bad, val = list(data.bad), None
        if val_dir is not None:
            vdata = load_in_memory(val_dir, config.image_size, classes=classes, strict=config.strict,
                                   progress=progress)
            bad += vdata.bad
            val = MemoryEvalBatches(vdata, config.eval_batch_size, norm)
        return RunData(train, val, classes, bad, True, list(data.bad))
    dataset = SafeImageFolder(folder.train_dir, image_transform(config), max_side=config.image_size)
    train = FolderBatches(dataset, seed=config.seed, num_classes=num_classes, workers=config.workers,
                          rank=d.rank, world=d.world, global_batch=config.batch_size, **mix)
    val = None
    if val_dir is not None:
        val = folder_eval_loader(val_dir, config.image_size, normalize=norm, batch_size=config.eval_batch_size,
                                 workers=config.workers, classes=classes)
    return RunData(train, val, classes, [], False)


class MemoryEvalBatches:
    """Re-iterable evaluation batches over an in-memory split."""

    def __init__(self, data: InMemoryImages, batch_size: int, normalize: str) -> None:
        self.data, self.batch_size, self.normalize = data, batch_size, normalize

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.data.labels), self.batch_size):
            yield normalize_uint8(self.data.images[i:i + self.batch_size], self.normalize), \
                self.data.labels[i:i + self.batch_size]


def prefetches(device: torch.device) -> bool:
    """On a GPU the next batches are augmented while the step runs (Prefetch); on CPU they would share its cores."""
    return device.type == "cuda"


class BatchStream:
    """The training batches from ``start_step`` on, one per optimiser step, across epochs. With ``prefetch``
    (default: :func:`prefetches`, on a GPU) each epoch's batches are produced by a :class:`Prefetch` thread;
    ``busy_s`` adds up those threads' busy time."""

    def __init__(self, train_data: Any, spe: int, start_step: int, global_batch: int, d: Dist,
                 prefetch: bool | None = None) -> None:
        self.busy_s = 0.0
        self.prefetch = prefetches(d.device) if prefetch is None else prefetch
        self._batches = self._generate(train_data, spe, start_step, global_batch, d, self.prefetch)

    def _generate(self, train_data: Any, spe: int, step: int, global_batch: int, d: Dist,
                  prefetch: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[BadSample]]]:
        while True:
            batches = train_data.epoch(step // spe, step % spe, global_batch, d.rank, d.world)
            prefetcher = Prefetch(batches, pin=d.device.type == "cuda") if prefetch else None
            try:
                for item in prefetcher if prefetcher is not None else batches:
                    step += 1
                    yield item
            finally:
                if prefetcher is not None:
                    prefetcher.close()
                    self.busy_s += prefetcher.busy_s

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
        return next(self._batches)

    def close(self) -> None:
        """Stops the current epoch's prefetch thread (and counts its busy time)."""
        self._batches.close()
