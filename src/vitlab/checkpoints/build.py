"""Building a model from a config without allocating random weights that are about to be overwritten.

A ViT-B/16 holds 86M parameters (344 MB in float32). Building it on the meta device and assigning the loaded
tensors keeps a conversion at about two copies of the weights (the source file's arrays and the converted tensors)
instead of three, and skips the random initialisation (seconds on a CPU).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vitlab.checkpoints.strict import CheckpointError, load_state_dict_strict
from vitlab.model.config import ViTConfig
from vitlab.model.vit import VisionTransformer, sincos_2d

logger = logging.getLogger(__name__)


def qualified_name(cls: type) -> str:
    """``module:QualName``, the form stored in native checkpoints."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(name: str, source: str | os.PathLike) -> type:
    """Import a class named ``module:QualName``; only vitlab's own modules are imported, so a file cannot make the
    loader import arbitrary code."""
    module, _, qual = name.partition(":")
    if not qual or not (module == "vitlab" or module.startswith("vitlab.")):
        raise CheckpointError(f"{source}: class {name!r} is not a vitlab class (expected 'vitlab.<module>:<Class>')")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{source}: cannot find class {name!r} in this version of vitlab ({e})") from None
    if not isinstance(obj, type):
        raise CheckpointError(f"{source}: {name!r} is not a class")
    return obj


def model_from_state_dict(config: Any, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike,
                          model_cls: type[nn.Module] = VisionTransformer) -> nn.Module:
    """``model_cls(config)`` holding exactly ``state_dict`` (strict), in eval mode."""
    with torch.device("meta"):
        model = model_cls(config)
    persistent = set(model.state_dict())
    transient = [n for n, _ in model.named_buffers() if n not in persistent]
    if transient and not (isinstance(model, VisionTransformer) and transient == ["pos_embed_fixed"]):
        # An architecture with computed buffers we do not know how to rebuild: pay for one real initialisation.
        model = model_cls(config)
    load_state_dict_strict(model, state_dict, source)
    if transient and isinstance(model, VisionTransformer):
        assert isinstance(config, ViTConfig)
        # The fixed sine-cosine table is not stored in checkpoints; recompute it for the config's grid.
        model.register_buffer("pos_embed_fixed", sincos_2d(config.grid_size, config.width), persistent=False)
    return model.eval()


def resolve_config(spec: "str | ViTConfig | dict[str, Any] | None", derived: dict[str, Any],
                   unknown: dict[str, str], numerics: dict[str, Any], source: str | os.PathLike,
                   resnet_numerics: dict[str, Any] | None = None) -> ViTConfig:
    """The config of a foreign checkpoint from what its shapes say and what the caller says.

    ``derived``: fields read from the file (its shapes, or its own config); ``unknown``: fields the file cannot
    tell, with the reason; ``numerics``: the format's own numerics (GELU form, epsilons). ``spec`` is None (the
    file alone), a name like ``"ViT-B/16"`` (it supplies what the file cannot tell, such as the number of heads of
    a fused qkv weight; everything the file tells wins, so a 2-block ViT-S/16 loads with 2 blocks), a dict of
    field overrides on top of the file, or a full :class:`ViTConfig` taken as it is. A field nobody can tell
    raises an error.
    """
    from vitlab.model.config import config_from_name

    if isinstance(spec, ViTConfig):
        return spec
    if isinstance(spec, str):
        try:
            named = config_from_name(spec)
            config = config_from_name(spec, **derived, **numerics)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        differ = [f"{k}={derived[k]!r} (not {getattr(named, k)!r})" for k in ("width", "depth", "mlp_dim", "num_heads",
                  "patch_size") if k in derived and hasattr(named, k) and derived[k] != getattr(named, k)]
        if differ:
            logger.warning("%s: the file's shapes differ from %s and are kept: %s", source, spec, ", ".join(differ))
    else:
        overrides = dict(spec or {})
        missing = {k: why for k, why in unknown.items() if k not in overrides}
        if missing:
            reasons = "; ".join(f"{k}: {why}" for k, why in missing.items())
            raise CheckpointError(f"{source}: the shapes do not tell {sorted(missing)} ({reasons}); pass "
                                  f"model='ViT-B/16'-style, model={{'{next(iter(missing))}': ...}} or a ViTConfig")
        try:
            config = ViTConfig(**{**derived, **numerics, **overrides})
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: {e}") from None
    if config.backbone is not None and resnet_numerics:
        config = config.replace(backbone=dataclasses.replace(config.backbone, **resnet_numerics))
    return config


def count_stage_units(has_unit: Callable[[int, int], bool]) -> tuple[int, ...]:
    """Units per ResNet stage, read off a checkpoint's key names: ``has_unit(stage, unit)`` (both 0-based) says
    whether that unit's first conv is present. Shared by the formats that store a hybrid's backbone."""
    layers: list[int] = []
    while has_unit(len(layers), 0):
        units = 0
        while has_unit(len(layers), units):
            units += 1
        layers.append(units)
    return tuple(layers)
