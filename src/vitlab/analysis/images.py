"""Reading the images an analysis runs on: decode, convert to RGB, resize to the model's resolution, normalise.

Evaluation in the official code resizes the whole image to the model's resolution (no crop) and scales pixels
to [-1, 1]; that is the default here. Models trained with another scaling say so through
:func:`input_normalization`, or the caller picks one by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

# name -> (mean, std) applied to pixels in [0, 1]
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "official": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1], the official ViT checkpoints (and HF google/vit-*)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision/timm ImageNet statistics
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # plain [0, 1]
}


def input_normalization(model: nn.Module, default: str = "official") -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, source) of the scaling ``model`` expects.

    A checkpoint loader may record the scaling on the model as ``model.input_mean`` / ``model.input_std``
    (sequences per channel) or in a ``model.metadata`` / ``model.pretrained_cfg`` mapping with ``mean``/``std``
    keys (the names timm uses); without any of these the ``default`` named scaling is used.
    """
    mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if mean is not None and std is not None:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std), "model.input_mean/input_std"
    for attr in ("metadata", "pretrained_cfg"):
        meta: Any = getattr(model, attr, None)
        if isinstance(meta, dict):
            for mk, sk in (("mean", "std"), ("input_mean", "input_std"), ("image_mean", "image_std")):
                if meta.get(mk) is not None and meta.get(sk) is not None:
                    return (tuple(float(v) for v in meta[mk]), tuple(float(v) for v in meta[sk]),
                            f"model.{attr}[{mk!r}]")
    if default not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {default!r}; expected one of {sorted(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[default]
    return mean, std, default


def list_images(root: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``root`` (a file or a folder searched recursively), sorted by path, at most ``limit``.

    The selection is spread over the sorted list (every k-th file) so that an ImageFolder tree contributes images
    of every class rather than the first class only.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--images: {root} is neither an image file nor a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    if limit is not None and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def read_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """One image as (3, H, W) float in [0, 1] at ``size``; any size and colour mode in, RGB out."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)  # 3, h, w uint8
    except Exception as e:  # torchvision raises RuntimeError for unreadable content
        raise ValueError(f"cannot decode image {path}: {e}") from e
    if img.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        img = (img.to(torch.float32) / torch.iinfo(img.dtype).max * 255).round().to(torch.uint8)
    img = TF.resize(img, list(size), antialias=True)
    return img.to(torch.float32) / 255.0


def read_images(paths: Sequence[Path], size: tuple[int, int],
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input (B, 3, H, W) normalised with mean/std, display images (B, 3, H, W) in [0, 1])."""
    raw = torch.stack([read_image(p, size) for p in paths])  # B, 3, H, W in [0, 1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (raw - m) / s, raw
