"""``create_model`` and ``list_models`` over the one table of named sizes in ``config.py``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitlab.model.config import ResNetClassifierConfig, ViTConfig, config_from_name, list_model_names
from vitlab.model.resnet_classifier import ResNetClassifier
from vitlab.model.vit import VisionTransformer


def create_model(name: str, *, num_classes: int = 1000, image_size: int | tuple[int, int] = 224,
                 **overrides: Any) -> VisionTransformer | ResNetClassifier:
    """Build a named model, e.g. ``create_model("ViT-B/16")`` or ``create_model("ViT-S/16", gelu="exact")``.

    Any :class:`~vitlab.model.config.ViTConfig` field can be overridden; unknown names, unknown fields and
    impossible combinations raise a ``ValueError`` saying what is allowed. ResNet names (``"ResNet-50x2"``) build
    a :class:`~vitlab.model.resnet_classifier.ResNetClassifier` and take its config's fields instead.
    """
    config = config_from_name(name, num_classes=num_classes, image_size=image_size, **overrides)
    return model_from_config(config)


def model_from_config(config: ViTConfig | ResNetClassifierConfig) -> VisionTransformer | ResNetClassifier:
    """The model class that a config describes (what a checkpoint's stored config rebuilds)."""
    if isinstance(config, ResNetClassifierConfig):
        return ResNetClassifier(config)
    if isinstance(config, ViTConfig):
        return VisionTransformer(config)
    raise TypeError(f"expected a ViTConfig or ResNetClassifierConfig, got {type(config).__name__}")


# Config classes by name, so a serialised config (class name + JSON) is rebuilt without guessing from its keys.
CONFIG_CLASSES: dict[str, type] = {"ViTConfig": ViTConfig, "ResNetClassifierConfig": ResNetClassifierConfig}


def config_from_json(text: str, config_class: str = "ViTConfig") -> ViTConfig | ResNetClassifierConfig:
    """Rebuild a config from its ``to_json()`` text and its class name (``type(config).__name__``)."""
    if config_class not in CONFIG_CLASSES:
        raise ValueError(f"unknown config class {config_class!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[config_class].from_json(text)


def list_models() -> list[str]:
    """Every name ``create_model`` accepts, in the paper's notation."""
    return list_model_names()


def count_parameters(name: str, **overrides: Any) -> int:
    """Parameter count of a named model, built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model: nn.Module = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())
