"""Batches as a function of (seed, epoch, step): rank slices, resume offsets, and skipped bad files."""

from __future__ import annotations

import pytest
import torch

from tests.train.tiny import make_folder
from vitlab.data.folder import SafeImageFolder, load_in_memory, scan
from vitlab.data.loaders import FolderBatches, InMemoryBatches, Prefetch
from vitlab.data.transforms import BatchAugment, train_transform


def _memory_batches(root, **kw):
    data = load_in_memory(root / "train", 16)
    aug = BatchAugment(16, crop="inception", crop_scale=(0.5, 1.0), randaugment_n=1)
    return InMemoryBatches(data, aug, seed=7, num_classes=3, **kw)


def test_in_memory_decoding_equals_files(tmp_path):
    from PIL import Image
    import numpy as np

    make_folder(tmp_path)
    data = load_in_memory(tmp_path / "train", 16)
    samples, classes = scan(tmp_path / "train")
    assert classes == ["c0", "c1", "c2"] and len(data.labels) == len(samples) == 48
    path, label = samples[5]
    assert data.labels[5] == label
    assert torch.equal(data.images[5], torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1))


def test_two_ranks_split_the_global_batch(tmp_path):
    make_folder(tmp_path)
    batches = _memory_batches(tmp_path, mixup=0.5, cutmix=1.0)
    full = list(batches.epoch(0, 0, 8))
    r0 = list(batches.epoch(0, 0, 8, rank=0, world=2))
    r1 = list(batches.epoch(0, 0, 8, rank=1, world=2))
    assert len(full) == 6
    for (x, y, _), (x0, y0, _), (x1, y1, _) in zip(full, r0, r1):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_resume_offset_replays_the_tail_and_epochs_differ(tmp_path):
    make_folder(tmp_path)
    batches = _memory_batches(tmp_path)
    full = list(batches.epoch(1, 0, 8))
    tail = list(batches.epoch(1, 4, 8))
    assert len(tail) == 2
    for (x, y, _), (xt, yt, _) in zip(full[4:], tail):
        assert torch.equal(x, xt) and torch.equal(y, yt)
    other = list(batches.epoch(2, 0, 8))
    assert not torch.equal(full[0][1], other[0][1]) or not torch.equal(full[0][0], other[0][0])
    # An epoch visits every image once (drop-last: 48 images, batch 8).
    labels = torch.cat([y for _, y, _ in full])
    assert sorted(labels.tolist()) == sorted(batches.data.labels.tolist())


def test_folder_batches_skip_bad_files_and_match_across_workers(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "c1" / "broken.png").write_bytes(b"")
    (tmp_path / "train" / "c2" / "notimage.jpg").write_text("hello")
    tf = train_transform(16, crop="inception", crop_scale=(0.5, 1.0), randaugment_n=1)
    ds = SafeImageFolder(tmp_path / "train", tf)
    assert len(ds) == 50
    outs = []
    for workers in (0, 1):
        fb = FolderBatches(ds, seed=1, num_classes=3, workers=workers, global_batch=10)
        outs.append(list(fb.epoch(0, 0, 10)))
    bad = sorted(b.path for _, _, bad_list in outs[0] for b in bad_list)
    assert bad == sorted([str(tmp_path / "train" / "c1" / "broken.png"), str(tmp_path / "train" / "c2" / "notimage.jpg")])
    assert sum(len(y) for _, y, _ in outs[0]) == 48
    for (xa, ya, _), (xb, yb, _) in zip(*outs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _numbered(n: int, produced: list[int], fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"bad batch {i}")
        produced.append(i)
        yield (torch.full((2,), float(i)), i)


def test_prefetch_yields_every_item_in_order():
    produced: list[int] = []
    with Prefetch(_numbered(20, produced), depth=3) as batches:
        got = [(float(x[0]), i) for x, i in batches]
    assert got == [(float(i), i) for i in range(20)] and produced == list(range(20))
    assert batches.busy_s > 0


def test_prefetch_raises_the_producers_error_at_its_item():
    got = []
    with pytest.raises(ValueError, match="bad batch 5"):
        with Prefetch(_numbered(20, [], fail_at=5)) as batches:
            for _, i in batches:
                got.append(i)
    assert got == [0, 1, 2, 3, 4]


def test_prefetch_close_stops_the_producer_early():
    produced: list[int] = []
    batches = Prefetch(_numbered(1000, produced), depth=2)
    for _, i in batches:
        if i == 3:
            break
    batches.close()
    assert not batches.running
    assert len(produced) <= 4 + 2 + 1  # consumed, queued, and the one in the producer's hands
