"""The Vision Transformer family: only what runs in the forward pass."""

from vitlab.model.config import ResNetConfig, ViTConfig, config_from_name
from vitlab.model.factory import count_parameters, create_model, list_models
from vitlab.model.vit import VisionTransformer

__all__ = [
    "ResNetConfig",
    "ViTConfig",
    "VisionTransformer",
    "config_from_name",
    "count_parameters",
    "create_model",
    "list_models",
]
