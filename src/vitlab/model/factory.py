"""``create_model`` and ``list_models`` over the one table of named sizes in ``config.py``."""

from __future__ import annotations

from typing import Any

import torch

from vitlab.model.config import config_from_name, list_model_names
from vitlab.model.vit import VisionTransformer


def create_model(name: str, *, num_classes: int = 1000, image_size: int | tuple[int, int] = 224,
                 **overrides: Any) -> VisionTransformer:
    """Build a named model, e.g. ``create_model("ViT-B/16")`` or ``create_model("ViT-S/16", gelu="exact")``.

    Any :class:`~vitlab.model.config.ViTConfig` field can be overridden; unknown names, unknown fields and
    impossible combinations raise a ``ValueError`` saying what is allowed.
    """
    config = config_from_name(name, num_classes=num_classes, image_size=image_size, **overrides)
    return VisionTransformer(config)


def list_models() -> list[str]:
    """Every name ``create_model`` accepts, in the paper's notation."""
    return list_model_names()


def count_parameters(name: str, **overrides: Any) -> int:
    """Parameter count of a named model, built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())
