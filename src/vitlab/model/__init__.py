"""The Vision Transformer family (and the BiT ResNet baseline): only what runs in the forward pass."""

from vitlab.model.config import ResNetClassifierConfig, ResNetConfig, ViTConfig, config_from_name
from vitlab.model.factory import config_from_json, count_parameters, create_model, list_models, model_from_config
from vitlab.model.resnet_classifier import ResNetClassifier
from vitlab.model.vit import VisionTransformer

__all__ = [
    "ResNetClassifier",
    "ResNetClassifierConfig",
    "ResNetConfig",
    "ViTConfig",
    "VisionTransformer",
    "config_from_json",
    "config_from_name",
    "count_parameters",
    "create_model",
    "list_models",
    "model_from_config",
]
