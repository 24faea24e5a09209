"""Tiny ImageFolders and tiny model specs for the study tests: 3 colour-coded classes of 16-px PNGs, and a source
and a target that share spatial structure (where a bright square is), for transfer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_VIT = "ViT-Ti/16:patch_size=4:width=16:depth=1:num_heads=2:mlp_dim=32"
TINY_RESNET = "ResNet-26:width_factor=0.25:num_groups=8"
TINY_RECIPE = ["image_size=16", "batch_size=8", "threads=1", "randaugment_n=0"]  # the engine's precision, as studies
# Transfer data: flips would swap the left/right and quadrant classes, a 4-px shift moves the square too far.
TRANSFER_RECIPE = TINY_RECIPE + ["hflip=false", "crop_pad=2", "workers=0"]


def make_folder(root: Path, train_per_class: int = 20, test_per_class: int = 6, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (16, 16, 3))
                a[..., c % 3] += 150  # each class is dominated by one colour channel: learnable in a few steps
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _no_probe_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step probe on a busy machine times again after a pause; in tests, without the pause."""
    from vitlab.study import runner

    monkeypatch.setattr(runner, "PROBE_RETRY_WAIT_SECONDS", 0.0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny_data"))


def make_square_folder(root: Path, regions: dict[str, tuple[int, int, int, int]], train_per_class: int,
                       test_per_class: int, seed: int, tint: tuple[int, int, int] = (0, 0, 0)) -> Path:
    """16-px noise images with a white 4x4 square placed at random inside the class's region (rows r0:r1, columns
    c0:c1): the class is *where* the square is, which a randomly initialised ViT (position embedding N(0, 0.02),
    mean-pooled tokens) hardly sees and a few hundred steps of pre-training on other regions teach."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for name, (r0, r1, c0, c1) in regions.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 120, (16, 16, 3)) + np.array(tint)
                r, c = rng.integers(r0, r1 - 3), rng.integers(c0, c1 - 3)
                a[r:r + 4, c:c + 4] = 255
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


QUADRANTS = {"top_left": (0, 8, 0, 8), "top_right": (0, 8, 8, 16), "bottom_left": (8, 16, 0, 8),
             "bottom_right": (8, 16, 8, 16)}
HALVES = {"left": (0, 16, 0, 8), "right": (0, 16, 8, 16)}


@pytest.fixture(scope="session")
def transfer_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, target): four quadrant classes, 40 training images each; two half-image classes (another tint),
    20 training and 30 test images each."""
    root = tmp_path_factory.mktemp("transfer_data")
    return (make_square_folder(root / "source", QUADRANTS, 40, 10, seed=1),
            make_square_folder(root / "target", HALVES, 20, 30, seed=2, tint=(40, 0, 0)))
