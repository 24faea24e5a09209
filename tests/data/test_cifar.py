"""CIFAR through torchvision -> ImageFolder, on a locally written archive in torchvision's format (no network)."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
from PIL import Image
from torchvision import datasets

from vitlab.data.cifar import cifar_to_folder


def _fake_cifar10(root, monkeypatch):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
    batch = {"data": data, "labels": [0, 3, 3, 9]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    # Our archive is not the published one: give torchvision's (public) file lists our files' md5 sums, so its
    # integrity checks run and pass.
    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")]
                                                         for i in range(1, 6)])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": md5("batches.meta")})
    return data


def test_cifar_written_as_image_folder(tmp_path, monkeypatch):
    data = _fake_cifar10(tmp_path / "cache", monkeypatch)
    out = cifar_to_folder("cifar10", tmp_path / "c10", download=False, cache=tmp_path / "cache")
    files = sorted((out / "train" / "cat").iterdir())
    assert len(files) == 10  # 2 cats per batch x 5 batches
    first_cat = data[1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(out / "train" / "cat" / "00001.png")), first_cat)
    assert len(list((out / "test").rglob("*.png"))) == 4
