"""vitlab's own checkpoint format: one safetensors file whose metadata holds everything needed to rebuild the
model, so ``vitlab.load(path)`` needs nothing but the file (as nanoGPT saves its config in every checkpoint).

Metadata (all strings, as safetensors requires):

    format          "vitlab"
    format_version  "1"
    config_class    "vitlab.model.config:ViTConfig"   (any vitlab config with to_json/from_json)
    model_class     "vitlab.model.vit:VisionTransformer" (built as model_class(config))
    config          the config's JSON
    labels          JSON list of class names, or "null"

Weights are the model's own ``state_dict()`` (timm-style keys) in their stored dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.checkpoints.build import model_from_state_dict, qualified_name, resolve_class
from vitlab.checkpoints.io import read_safetensors, safetensors_metadata
from vitlab.checkpoints.strict import CheckpointError
from vitlab.io import atomic_write

FORMAT = "vitlab"
FORMAT_VERSION = "1"


def is_native(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_native` (reads the header only)."""
    meta = safetensors_metadata(path)
    return meta.get("format") == FORMAT


def save_native(model: nn.Module, path: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Write ``model`` (anything with a ``config`` that has ``to_json``) and its class names to ``path``.

    The file is written next to its destination and renamed, so an existing file is never left half-written.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json"):
        raise TypeError(f"save: {type(model).__name__} has no .config with to_json(); cannot write a vitlab checkpoint")
    if labels is None:
        labels = getattr(model, "labels", None)
    if labels is not None:
        labels = [str(label) for label in labels]
        num_classes = getattr(config, "num_classes", None)
        if num_classes is not None and len(labels) != num_classes:
            raise ValueError(f"save: {len(labels)} labels given for a model with num_classes={num_classes}")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_class": qualified_name(type(config)),
        "model_class": qualified_name(type(model)),
        "config": config.to_json(),
        "labels": json.dumps(labels),
    }
    # safetensors refuses views that share storage; a contiguous copy only happens for the (rare) views.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_native(path: str | os.PathLike) -> tuple[Any, type[nn.Module], dict[str, torch.Tensor], list[str] | None]:
    """(config, model class, state dict, labels) of a native checkpoint, validated."""
    meta = safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a vitlab checkpoint (its safetensors metadata has format={meta.get('format')!r}, "
            f"expected 'vitlab'); pass format='timm' or format='hf' for weights saved by those libraries"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: vitlab format version {version!r} is not supported (this vitlab reads "
                              f"version {FORMAT_VERSION})")
    for key in ("config_class", "model_class", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: vitlab metadata lacks {key!r}")
    config_cls = resolve_class(meta["config_class"], path)
    model_cls = resolve_class(meta["model_class"], path)
    try:
        config = config_cls.from_json(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: stored config is not a valid {config_cls.__name__}: {e}") from None
    try:
        labels = json.loads(meta.get("labels", "null"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: stored labels are not JSON: {e}") from None
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise CheckpointError(f"{path}: stored labels must be a list of strings")
    return config, model_cls, read_safetensors(path), labels


def load_native(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved by :func:`save_native`; ``model.labels`` holds its class names (or None)."""
    config, model_cls, state_dict, labels = read_native(path)
    model = model_from_state_dict(config, state_dict, path, model_cls)
    model.labels = labels
    return model
