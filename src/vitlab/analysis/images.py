"""Reading the images an analysis runs on: decode, convert to RGB, resize to the model's resolution, normalise.

Evaluation in the official code resizes the whole image to the model's resolution (no crop) and scales pixels
to [-1, 1]; that is the default here. :func:`input_normalization` finds the scaling a checkpoint records, or the
caller picks one by name (``official``, ``imagenet``, ``none`` = plain [0, 1]).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

def _named(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # The training engineer's table, so that inspect scales images exactly as training and evaluation did.
    from vitlab.data.transforms import NORMALIZATIONS

    name = "official" if name == "auto" else name
    if name not in NORMALIZATIONS:
        raise ValueError(f"--normalize: unknown normalization {name!r}; expected one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


def input_normalization(model: nn.Module, checkpoint: str | Path | None = None,
                        default: str = "official") -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, source) of the input scaling ``model`` expects, from the first of:

    1. ``model.input_mean`` / ``model.input_std``, or ``mean``/``std`` in a ``model.pretrained_cfg`` mapping
       (the names timm uses), should a loader record them;
    2. next to ``checkpoint``: a Hugging Face ``preprocessor_config.json`` (``image_mean``/``image_std``), or the
       ``config.json`` that ``vitlab train`` writes into its run folder (its ``normalize`` field);
    3. the ``default`` named scaling (the official [-1, 1]).
    """
    mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if mean is not None and std is not None:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std), "model.input_mean/input_std"
    meta: Any = getattr(model, "pretrained_cfg", None)
    if isinstance(meta, dict) and meta.get("mean") is not None and meta.get("std") is not None:
        return tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]), "model.pretrained_cfg"
    if checkpoint is not None and not str(checkpoint).startswith("hf-hub:"):
        path = Path(checkpoint)
        folder = path if path.is_dir() else path.parent
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = _read_json(pre)
            if cfg.get("image_mean") is not None and cfg.get("image_std") is not None:
                return (tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"]),
                        str(pre))
        run_cfg = folder / "config.json"
        if run_cfg.is_file() and path.is_file():
            name = _read_json(run_cfg).get("normalize")
            if isinstance(name, str):
                mean, std = _named(name)
                return mean, std, f"{run_cfg} (normalize={name!r})"
    mean, std = _named(default)
    return mean, std, default


def _read_json(path: Path) -> dict:
    import json

    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: not readable JSON (%s)", path, e)
        return {}
    return obj if isinstance(obj, dict) else {}


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
        with warnings.catch_warnings():
            # torchvision 0.29 announces a move of its decoders to torchcodec; they still work and are what we use.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
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
