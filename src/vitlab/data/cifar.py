"""CIFAR-10/100 through torchvision (needs a network the first time), written out as an ImageFolder tree so that
every vitlab command (train, eval, predict, the study) reads it like any user folder.

    from vitlab.data.cifar import cifar_to_folder
    cifar_to_folder("cifar10", "data/cifar10")     # data/cifar10/{train,test}/<class>/<index>.png
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cifar_to_folder(name: str, out: str | os.PathLike, *, download: bool = True,
                    cache: str | os.PathLike | None = None) -> Path:
    """Write torchvision's CIFAR-10 or CIFAR-100 as ``out/{train,test}/<class>/<index>.png`` (lossless PNG).

    ``cache``: where torchvision keeps (or finds) the original archive, default ``out/.torchvision``. A split
    already written is left as it is.
    """
    from torchvision import datasets

    classes = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    if name not in classes:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(classes)}")
    out = Path(out)
    cache = Path(cache) if cache else out / ".torchvision"
    for split, train in (("train", True), ("test", False)):
        target = out / split
        if target.is_dir() and any(target.iterdir()):
            log.info("%s exists, kept", target)
            continue
        try:
            ds = classes[name](str(cache), train=train, download=download)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: cannot load from {cache} ({e}); pass download=True with a network") from None
        tmp = out / f".{split}.partial"
        for c in ds.classes:
            (tmp / c).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(ds):
            img.save(tmp / ds.classes[label] / f"{i:05d}.png")
        tmp.rename(target)  # a split appears complete or not at all
    return out
