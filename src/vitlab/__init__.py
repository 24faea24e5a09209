"""vitlab: the Vision Transformer of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words", as a library.

``import vitlab`` pulls in torch only; checkpoint formats, data, training and analysis load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer, count_parameters, create_model, list_models

__version__ = "0.1.0"

# Public names that live in heavier submodules, imported on first access.
_LAZY = {
    "load": "vitlab.checkpoints",
    "save": "vitlab.checkpoints",
}


# Subpackages reachable as attributes (``vitlab.analysis.attention_rollout``) without importing them up front.
_SUBPACKAGES = {"analysis", "bench", "checkpoints", "data", "study", "train"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"vitlab.{name}")
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")


__all__ = [
    "ResNetConfig",
    "ViTConfig",
    "VisionTransformer",
    "count_parameters",
    "create_model",
    "list_models",
    "load",
    "save",
]
