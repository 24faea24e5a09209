"""A tiny ImageFolder (3 colour-coded classes of 16-px PNGs) and tiny model specs for the study tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_VIT = "ViT-Ti/16:patch_size=4:width=16:depth=1:num_heads=2:mlp_dim=32"
TINY_RESNET = "ResNet-26:width_factor=0.25:num_groups=8"
TINY_RECIPE = ["image_size=16", "batch_size=8", "threads=1", "randaugment_n=0"]  # bf16 autocast, as the studies


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny_data"))
