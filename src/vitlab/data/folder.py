"""Image folders (torchvision's ImageFolder layout) read safely, streamed by DataLoader workers or held in memory.

``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*`` (or ``test/``). Unreadable files never crash a run: they come
back as :class:`BadSample` markers that the collate function drops and reports, or raise under ``strict``.

Links are resolved so that every real file counts once: a class folder may be a link (that is how study subsets
share images), and so may an image file, but a link to a folder inside a class folder is not followed (a link back
to an ancestor would repeat the class's images without end, a link elsewhere would pull in files from outside the
dataset); each such link is skipped with one warning naming it.
The in-memory mode decodes a small dataset once into one uint8 tensor (N, 3, S, S) so that augmentation runs on
whole batches (see :class:`vitlab.data.transforms.BatchAugment`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from vitlab.data.images import IMG_EXTENSIONS, BadImageError, load_rgb
from vitlab.data.transforms import seeded_global_rng

log = logging.getLogger(__name__)


@dataclass
class BadSample:
    """Stands in for an image that could not be decoded."""

    path: str
    reason: str


def split_dirs(data_dir: str | Path) -> tuple[Path, Path | None]:
    """``DIR`` -> (``DIR/train``, ``DIR/val`` or ``DIR/test`` or None). Raises if ``DIR/train`` is missing."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{root}: expected an ImageFolder root with a train/ subfolder "
                                f"(train/<class>/<image>) and val/ or test/")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    return train, None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """The same folder is scanned several times in a run (size estimate, training, evaluation): warn once."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def image_files(directory: str | Path, *, seen: set[str] | None = None, root: str | Path | None = None) -> list[str]:
    """The image-extension files under ``directory``, recursively, in torchvision ImageFolder's order (folders
    sorted by path, files by name), each real file once.

    ``directory`` itself may be a link; below it, links to folders are skipped with one warning each (see the
    module docstring), and file links are resolved. ``seen``: the real paths already taken (shared across the
    class folders of one split, so a file linked into two classes counts once, in the first); ``root``: the
    dataset folder ``directory`` belongs to (default: ``directory``), for the warnings.
    """
    seen = set() if seen is None else seen
    top = str(directory)
    root = str(root if root is not None else directory)
    real_root = os.path.realpath(root)
    per_dir: list[tuple[str, list[str]]] = []
    pending = [top]
    while pending:
        current = pending.pop()
        real_current = os.path.realpath(current)
        names: list[str] = []
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_symlink() and entry.is_dir():
                    target = os.path.realpath(entry.path)
                    if _within(real_current, target):
                        why = f"a loop: it points back to {target}"
                    elif _within(target, real_root):
                        why = f"its images are read where it points, {target}"
                    else:
                        why = f"it points out of {root}, to {target}"
                    _warn_once(f"{entry.path}: skipped a link to a folder ({why})")
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    names.append(entry.name)
        per_dir.append((current, names))
    files: list[str] = []
    duplicates: list[str] = []
    for current, names in sorted(per_dir):
        real_current = os.path.realpath(current)
        for name in sorted(names):
            path = os.path.join(current, name)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_current, name)
            if real in seen:
                duplicates.append(path)
                continue
            seen.add(real)
            files.append(path)
    if duplicates:
        _warn_once(f"{top}: skipped {len(duplicates)} link(s) to image files already counted (first: "
                   f"{duplicates[0]})")
    return files


def find_classes(root: str | Path) -> list[str]:
    """The sorted class folder names of ``root`` (folders or links to folders)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    return classes


def scan(root: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs of every image-extension file under ``root/<class>/`` and the sorted class names.

    ``classes``: use this class list (e.g. the training set's) so labels agree across splits.
    """
    root = Path(root)
    found = find_classes(root)
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise ValueError(f"{root}: classes {sorted(set(found) - set(classes))} are not in the training classes")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    seen: set[str] = set()
    for name in found:
        samples += [(path, class_to_idx[name]) for path in image_files(root / name, seen=seen, root=root)]
    if not samples:
        raise FileNotFoundError(f"{root}: no images found (extensions {', '.join(IMG_EXTENSIONS)})")
    return samples, classes


def empty_classes(samples: list[tuple[str, int]], classes: list[str]) -> list[str]:
    """The classes without a single image file among ``samples``."""
    present = {label for _, label in samples}
    return [name for i, name in enumerate(classes) if i not in present]


class SafeImageFolder(Dataset):
    """An ImageFolder whose items are ``(image, label)`` or ``(BadSample, label)``; never raises on bad files.

    An index may come as ``(index, seed)``: the transform then draws from a generator seeded with ``seed``, so
    each sample's augmentation is reproducible whichever worker decodes it.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, classes: list[str] | None = None,
                 max_side: int | None = None) -> None:
        self.root = Path(root)
        self.samples, self.classes = scan(root, classes)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            img = load_rgb(path, self.max_side)
        except BadImageError as e:
            return BadSample(e.path, e.reason), label
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                # v2 transforms draw from the global RNG; seed it locally for a per-sample reproducible result.
                with seeded_global_rng(seed):
                    img = self.transform(img)
        return img, label


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
    """Stack the good samples; return the bad ones separately so the caller can count, list or stop."""
    good = [(x, y) for x, y in batch if not isinstance(x, BadSample)]
    bad = [x for x, _ in batch if isinstance(x, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([x for x, _ in good])
    labels = torch.tensor([y for _, y in good], dtype=torch.long)
    return images, labels, bad


@dataclass
class InMemoryImages:
    """A decoded dataset: ``images`` uint8 (N, 3, S, S), ``labels`` int64 (N,), class names and skipped files."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    bad: list[BadSample]


def estimate_bytes(num_images: int, image_size: int) -> int:
    return num_images * 3 * image_size * image_size


def load_in_memory(root: str | Path, image_size: int, *, classes: list[str] | None = None, strict: bool = False,
                   threads: int = 2, progress: bool = False) -> InMemoryImages:
    """Decode every image under ``root`` once, resized to (image_size, image_size), into one uint8 tensor.

    Unreadable files are skipped and returned in ``bad`` (or raise :class:`BadImageError` under ``strict``).
    """
    samples, classes = scan(root, classes)
    resize = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])

    def decode(item: tuple[str, int]) -> torch.Tensor | BadSample:
        path, _ = item
        try:
            img = load_rgb(path, max_side=image_size)
        except BadImageError as e:
            if strict:
                raise
            return BadSample(e.path, e.reason)
        return resize(img)

    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    keep = torch.zeros(len(samples), dtype=torch.bool)
    bad: list[BadSample] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(decode, samples)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(samples), desc=f"decode {Path(root).name}", unit="img", leave=False)
        for i, out in enumerate(results):
            if isinstance(out, BadSample):
                bad.append(out)
            else:
                images[i] = out
                keep[i] = True
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return InMemoryImages(images[keep], labels[keep], classes, bad)
