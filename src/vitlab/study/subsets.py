"""Nested, class-balanced subsets of a training split (the paper's Sec. 4.2 / Fig. 4 trains on random 9M, 30M and
90M subsets of JFT-300M; here the same idea on the user's ImageFolder).

Every class's files are shuffled once with a seed; the subset for fraction ``f`` takes the first
``round(f * N / K)`` files of every class. Smaller fractions are therefore prefixes of larger ones (nested), each
class contributes the same number of images (balanced, unless a class has fewer), and the choice depends only on
the file list and the seed, so every model of a study sees exactly the same images. Subsets are materialised as
ImageFolder trees of symbolic links, so the training engine reads them like any other dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from vitlab.data.folder import scan, split_dirs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subset:
    """One materialised subset: its ImageFolder root (``train/`` links, ``test/`` link) and what it holds."""

    fraction: float
    root: Path
    per_class: int
    num_images: int
    digest: str
    """SHA-256 of the sorted relative file list: equal digests mean identical training images."""


def class_files(train_dir: str | Path) -> dict[str, list[str]]:
    """Class name -> sorted file paths relative to ``train_dir`` (what :func:`vitlab.data.folder.scan` reads)."""
    train_dir = Path(train_dir)
    samples, classes = scan(train_dir)
    files: dict[str, list[str]] = {c: [] for c in classes}
    for path, label in samples:
        files[classes[label]].append(os.path.relpath(path, train_dir))
    return {c: sorted(v) for c, v in files.items()}


def nested_subsets(files: dict[str, list[str]], fractions: list[float], seed: int = 0) -> dict[float, list[str]]:
    """Fraction -> the relative paths of its class-balanced subset; smaller fractions are subsets of larger ones.

    ``files`` maps each class to its files; every class is shuffled once with ``seed`` (independently of which
    fractions are asked for) and cut at ``max(1, round(f * N / K))`` files, capped at the class's size.
    """
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
    if not files or not any(files.values()):
        raise ValueError("no training images to draw subsets from")
    total = sum(len(v) for v in files.values())
    order = {}
    for name in sorted(files):
        shuffled = sorted(files[name])
        # A per-class generator keyed by the class name: adding or removing a class never reshuffles the others.
        random.Random(f"{seed}:{name}").shuffle(shuffled)
        order[name] = shuffled
    out: dict[float, list[str]] = {}
    for f in sorted(fractions):
        k = max(1, round(f * total / len(files)))
        if f == 1.0:
            chosen = [p for name in sorted(order) for p in order[name]]  # the full split, even if unbalanced
        else:
            short = [name for name in order if len(order[name]) < k]
            if short:
                log.warning("fraction %g: classes %s have fewer than %d images; all of theirs are used", f, short, k)
            chosen = [p for name in sorted(order) for p in order[name][:k]]
        out[f] = sorted(chosen)
    return out


def file_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


def materialise_subsets(data_dir: str | Path, fractions: list[float], out_dir: str | Path,
                        seed: int = 0) -> dict[float, Subset]:
    """Write ``out_dir/frac_<f>/train/<class>/<file>`` symbolic links (and ``test`` -> the full evaluation split)
    for each fraction; returns the subsets. An existing tree with the same file list is reused as is."""
    train_dir, eval_dir = split_dirs(data_dir)
    if eval_dir is None:
        raise ValueError(f"{data_dir}: the data-size study evaluates on the full test split; expected "
                         f"{Path(data_dir) / 'test'} (or val/) next to train/")
    files = class_files(train_dir)
    chosen = nested_subsets(files, fractions, seed)
    out_dir = Path(out_dir)
    subsets = {}
    for f, paths in chosen.items():
        root = out_dir / f"frac_{f:g}"
        digest = file_digest(paths)
        manifest = root / "subset.json"
        per_class = max(1, round(f * sum(len(v) for v in files.values()) / len(files)))
        if manifest.is_file() and json.loads(manifest.read_text()).get("digest") == digest:
            subsets[f] = Subset(f, root, per_class, len(paths), digest)
            continue
        # Build next to the final place and rename, so an interrupted build never looks complete.
        tmp = out_dir / f".frac_{f:g}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        for rel in paths:
            link = tmp / "train" / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((train_dir / rel).resolve())
        (tmp / eval_dir.name).symlink_to(eval_dir.resolve(), target_is_directory=True)
        (tmp / "subset.json").write_text(json.dumps(
            {"fraction": f, "seed": seed, "num_images": len(paths), "per_class": per_class, "digest": digest,
             "source": str(Path(data_dir).resolve())}, indent=1))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        subsets[f] = Subset(f, root, per_class, len(paths), digest)
    return subsets
