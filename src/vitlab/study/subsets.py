"""Nested, class-balanced subsets of a training split (the paper's Sec. 4.2 / Fig. 4 trains on random 9M, 30M and
90M subsets of JFT-300M; here the same idea on the user's ImageFolder), a validation split carved from the training
images (the paper's "minival": early stopping never looks at the test split), and class splits of one folder into
a source and a target dataset (transfer, Sec. 4.1).

Every class's files are shuffled once with a seed; the subset for fraction ``f`` takes the first
``round(f * N / K)`` files of every class (or a given number per class). Smaller subsets are therefore prefixes of
larger ones (nested), each class contributes the same number of images (balanced, unless a class has fewer), and
the choice depends only on the file list and the seed, so every model of a study sees exactly the same images.
The validation images are drawn first, with their own shuffle, and removed from the pool every subset is drawn
from. Subsets are ImageFolder trees of symbolic links, so the training engine reads them like any other dataset.
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
    """One materialised subset: its ImageFolder root (``train/`` links, ``val/`` links when a validation split was
    carved, ``test/`` link) and what it holds."""

    fraction: float
    root: Path
    per_class: int
    num_images: int
    digest: str
    """SHA-256 of the sorted relative file list: equal digests mean identical training images."""
    num_val: int = 0
    val_digest: str | None = None


def class_files(train_dir: str | Path) -> dict[str, list[str]]:
    """Class name -> sorted file paths relative to ``train_dir`` (what :func:`vitlab.data.folder.scan` reads)."""
    train_dir = Path(train_dir)
    samples, classes = scan(train_dir)
    files: dict[str, list[str]] = {c: [] for c in classes}
    for path, label in samples:
        files[classes[label]].append(os.path.relpath(path, train_dir))
    return {c: sorted(v) for c, v in files.items()}


def _shuffled(files: dict[str, list[str]], key: str) -> dict[str, list[str]]:
    order = {}
    for name in sorted(files):
        shuffled = sorted(files[name])
        # A per-class generator keyed by the class name: adding or removing a class never reshuffles the others.
        random.Random(f"{key}:{name}").shuffle(shuffled)
        order[name] = shuffled
    return order


def split_validation(files: dict[str, list[str]], fraction: float,
                     seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(validation, rest): ``round(fraction * n)`` random files of each class of ``n`` (at least one, and at least
    one left for training), drawn with their own shuffle; ``rest`` is what subsets are then drawn from."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    val, rest = {}, {}
    for name, shuffled in _shuffled(files, f"{seed}:val").items():
        if len(shuffled) < 2:
            raise ValueError(f"class {name!r} has {len(shuffled)} training image(s); carving a validation split "
                             f"needs at least 2 per class")
        k = min(len(shuffled) - 1, max(1, round(fraction * len(shuffled))))
        val[name], rest[name] = sorted(shuffled[:k]), sorted(shuffled[k:])
    return val, rest


def nested_per_class(files: dict[str, list[str]], counts: list[int | None], seed: int = 0) -> dict[int | None,
                                                                                                     list[str]]:
    """Images per class -> the relative paths of that class-balanced subset (``None``: every file); smaller counts
    are subsets of larger ones. Every class is shuffled once with ``seed``, whatever counts are asked for."""
    if any(c is not None and c < 1 for c in counts):
        raise ValueError(f"images per class must be positive, got {counts}")
    if not files or not any(files.values()):
        raise ValueError("no training images to draw subsets from")
    order = _shuffled(files, str(seed))
    out: dict[int | None, list[str]] = {}
    for k in counts:
        if k is None:
            out[k] = sorted(p for name in order for p in order[name])
            continue
        short = [name for name in order if len(order[name]) < k]
        if short:
            log.warning("%d images per class: classes %s have fewer; all of theirs are used", k, short)
        out[k] = sorted(p for name in sorted(order) for p in order[name][:k])
    return out


def nested_subsets(files: dict[str, list[str]], fractions: list[float], seed: int = 0) -> dict[float, list[str]]:
    """Fraction -> the relative paths of its class-balanced subset; smaller fractions are subsets of larger ones.

    ``files`` maps each class to its files; every class is shuffled once with ``seed`` (independently of which
    fractions are asked for) and cut at ``max(1, round(f * N / K))`` files, capped at the class's size; fraction 1
    is the whole split, even if unbalanced.
    """
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
    if not files or not any(files.values()):
        raise ValueError("no training images to draw subsets from")
    total = sum(len(v) for v in files.values())
    counts = {f: None if f == 1.0 else max(1, round(f * total / len(files))) for f in fractions}
    chosen = nested_per_class(files, sorted(set(counts.values()), key=lambda k: (k is None, k or 0)), seed)
    return {f: chosen[counts[f]] for f in sorted(fractions)}


def file_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


def _link_tree(root: Path, train_dir: Path, eval_dir: Path, train: list[str], val: list[str] | None,
               manifest: dict) -> None:
    """Write ``root/train/<rel>`` (and ``root/val/<rel>``) links and ``root/test`` -> ``eval_dir``, unless ``root``
    already holds the same manifest. Built next to the final place and renamed, so an interrupted build never looks
    complete."""
    if (root / "subset.json").is_file() and json.loads((root / "subset.json").read_text()) == manifest:
        return
    tmp = root.with_name(f".{root.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for split, paths in (("train", train), ("val", val or [])):
        for rel in paths:
            link = tmp / split / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((train_dir / rel).resolve())
    tmp.mkdir(parents=True, exist_ok=True)
    # Named by its role: a carved val/ must not be shadowed by a dataset whose evaluation split is called val/.
    (tmp / "test").symlink_to(eval_dir.resolve(), target_is_directory=True)
    (tmp / "subset.json").write_text(json.dumps(manifest, indent=1))
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)


def _splits(data_dir: str | Path, what: str) -> tuple[Path, Path]:
    train_dir, eval_dir = split_dirs(data_dir)
    if eval_dir is None:
        raise ValueError(f"{data_dir}: the {what} evaluates on the full test split; expected "
                         f"{Path(data_dir) / 'test'} (or val/) next to train/")
    return train_dir, eval_dir


def materialise_subsets(data_dir: str | Path, fractions: list[float], out_dir: str | Path, seed: int = 0,
                        val_fraction: float | None = None) -> dict[float, Subset]:
    """Write ``out_dir/frac_<f>/train/<class>/<file>`` symbolic links (and ``test`` -> the full evaluation split)
    for each fraction; returns the subsets. With ``val_fraction`` a validation split is carved from ``train/``
    first (:func:`split_validation`), linked as ``val/`` in every subset (so training evaluates on it) and never
    part of any subset's training images; fractions are then of the remaining images. An existing tree with the
    same file lists is reused as is."""
    train_dir, eval_dir = _splits(data_dir, "data-size study")
    files = class_files(train_dir)
    val: list[str] | None = None
    if val_fraction:
        val_files, files = split_validation(files, val_fraction, seed)
        val = sorted(p for v in val_files.values() for p in v)
    chosen = nested_subsets(files, fractions, seed)
    out_dir = Path(out_dir)
    subsets = {}
    for f, paths in chosen.items():
        root = out_dir / f"frac_{f:g}"
        per_class = max(1, round(f * sum(len(v) for v in files.values()) / len(files)))
        manifest = {"fraction": f, "seed": seed, "num_images": len(paths), "per_class": per_class,
                    "digest": file_digest(paths), "source": str(Path(data_dir).resolve())}
        if val is not None:
            manifest.update(num_val=len(val), val_digest=file_digest(val), val_fraction=val_fraction)
        _link_tree(root, train_dir, eval_dir, paths, val, manifest)
        subsets[f] = Subset(f, root, per_class, len(paths), manifest["digest"], len(val or []),
                            manifest.get("val_digest"))
    return subsets


def materialise_per_class(data_dir: str | Path, counts: list[int | None], out_dir: str | Path,
                          seed: int = 0) -> dict[int | None, Subset]:
    """Like :func:`materialise_subsets` with a number of images per class (``None``: the whole split), in
    ``out_dir/per_class_<k>`` (``per_class_all``)."""
    train_dir, eval_dir = _splits(data_dir, "study")
    files = class_files(train_dir)
    total = sum(len(v) for v in files.values())
    chosen = nested_per_class(files, counts, seed)
    subsets = {}
    for k, paths in chosen.items():
        root = Path(out_dir) / f"per_class_{'all' if k is None else k}"
        manifest = {"per_class": k, "seed": seed, "num_images": len(paths), "digest": file_digest(paths),
                    "source": str(Path(data_dir).resolve())}
        _link_tree(root, train_dir, eval_dir, paths, None, manifest)
        per_class = k if k is not None else max(len(v) for v in files.values())
        subsets[k] = Subset(len(paths) / total, root, per_class, len(paths), manifest["digest"])
    return subsets


def class_split(data_dir: str | Path, classes: list[str], out_dir: str | Path) -> Path:
    """An ImageFolder root at ``out_dir`` holding only ``classes`` of ``data_dir``: ``train/<class>`` and
    ``test/<class>`` are links to the original class folders (nothing is copied). How one labelled folder becomes
    the source and the target of a transfer study (e.g. CIFAR-10's animals and vehicles)."""
    train_dir, eval_dir = split_dirs(data_dir)
    if eval_dir is None:
        raise ValueError(f"{data_dir}: expected test/ (or val/) next to train/")
    if not classes:
        raise ValueError("expected at least one class name")
    known = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ValueError(f"{data_dir}/train has no class(es) {unknown}; it has {known}")
    missing = [c for c in classes if not (eval_dir / c).is_dir()]
    if missing:
        raise ValueError(f"{eval_dir} has no folder for class(es) {missing}")
    out_dir = Path(out_dir)
    manifest = {"source": str(Path(data_dir).resolve()), "classes": sorted(classes)}
    if (out_dir / "split.json").is_file() and json.loads((out_dir / "split.json").read_text()) == manifest:
        return out_dir
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for split, src in (("train", train_dir), ("test", eval_dir)):
        (tmp / split).mkdir(parents=True)
        for c in classes:
            (tmp / split / c).symlink_to((src / c).resolve(), target_is_directory=True)
    (tmp / "split.json").write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir
