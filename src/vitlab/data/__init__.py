"""Data: image folders read safely (bad files skipped or reported), in-memory datasets, torchvision v2 transforms
(the paper's inception crop and flip, RandAugment, mixup/cutmix) and the CIFAR-10 sample that ships with the package.
"""

from pathlib import Path


def sample_root() -> Path:
    """The bundled CIFAR-10 sample (ImageFolder layout with ``train/`` and ``test/``)."""
    return Path(__file__).resolve().parent / "cifar10_sample"
