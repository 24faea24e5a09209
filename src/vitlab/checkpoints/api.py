"""``vitlab.load`` and ``vitlab.save``: one entry point per direction for every checkpoint format.

Formats: ``"vitlab"`` (native safetensors with the config in its metadata), ``"npz"`` (official Google vit_jax /
big_vision ``.npz``), ``"timm"`` (timm state dicts) and ``"hf"`` (Hugging Face ``ViTModel`` /
``ViTForImageClassification`` directories). The format comes from the caller or from the file itself (the
``.npz`` extension, vitlab's safetensors metadata, an HF ``config.json``); keys are never sniffed to guess it.

After loading, two explicit adaptations are available (paper Sec. 3.2, fine-tuning): ``image_size=`` resamples
the position embedding exactly as the official code (bilinear, corners aligned, class slot apart) and
``num_classes=`` replaces the head by a fresh zero-initialised one; ``drop_pre_logits=True`` removes the
pre-logits layer (as the paper does when fine-tuning) and therefore also needs a fresh head.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vitlab.checkpoints.strict import CheckpointError
from vitlab.model.config import ViTConfig, to_hw
from vitlab.model.vit import VisionTransformer

logger = logging.getLogger(__name__)

Format = Literal["vitlab", "npz", "timm", "hf"]
FORMATS: tuple[str, ...] = ("vitlab", "npz", "timm", "hf")
HUB_PREFIX = "hf-hub:"
ModelSpec = str | ViTConfig | dict | None


def detect_format(source: str | os.PathLike) -> str:
    """The format a file or directory declares itself (extension, embedded metadata, config.json); raises a
    :class:`CheckpointError` asking for ``format=`` when it declares none."""
    from vitlab.checkpoints.native import is_native

    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        from vitlab.checkpoints.hf import read_config_json

        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: directory without config.json; expected a Hugging Face model directory")
        config = read_config_json(path / "config.json")
        if config.get("model_type") == "vit":
            return "hf"
        if "architecture" in config:
            return "timm"
        raise CheckpointError(f"{path}/config.json: model_type={config.get('model_type')!r} is not a ViT "
                              f"(expected model_type 'vit', or a timm config with 'architecture')")
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        if is_native(path):
            return "vitlab"
        raise CheckpointError(f"{path}: safetensors without vitlab metadata; pass format='timm' or format='hf' "
                              f"(and model='ViT-B/16'-style when the shapes cannot tell the architecture)")
    raise CheckpointError(f"{path}: cannot tell the checkpoint format from the file; pass format= one of {FORMATS}")


def load(source: str | os.PathLike | Mapping[str, torch.Tensor], *, format: Format | None = None,
         model: ModelSpec = None, image_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
         drop_pre_logits: bool = False) -> nn.Module:
    """Load a model from a checkpoint of any supported format, strictly.

    ``source``: a file, a directory (HF / timm hub layout), ``"hf-hub:<repo>"``, or (with ``format="timm"``)
    an in-memory state dict. ``model`` says what the shapes cannot: a name like ``"ViT-B/16"`` (it gives what the
    file cannot tell, such as the heads sharing a fused qkv weight; depth, width, MLP size, classes, grid,
    classifier and pre-logits come from the file, so a 2-block ViT-S/16 loads with 2 blocks), a dict of config
    fields on top of the shapes (``{"num_heads": 12}``), or a full :class:`ViTConfig` taken as it is. Each
    format brings its numerics (official: tanh GELU, eps 1e-6; timm/HF: exact GELU, their epsilons).
    The returned model is in eval mode and has ``model.labels`` (class names or None).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(source, Mapping):
        if format != "timm":
            raise ValueError("an in-memory state dict needs format='timm' (the only bare state-dict format)")
        from vitlab.checkpoints.timm import load_timm

        net = load_timm(source, model=model)
    else:
        net = _load_path(source, format, model)
    return adapt(net, image_size=image_size, num_classes=num_classes, drop_pre_logits=drop_pre_logits)


def _load_path(source: str | os.PathLike, format: str | None, model: ModelSpec) -> nn.Module:
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        from vitlab.checkpoints.hub import resolve_hub

        source, hub_format = resolve_hub(source[len(HUB_PREFIX):], format)
        format = format or hub_format
    if format is None:
        format = detect_format(source)
    if format == "vitlab":
        if model is not None:
            raise ValueError("model= is not used for format='vitlab': the file holds its own config")
        from vitlab.checkpoints.native import load_native

        return load_native(source)
    if format == "npz":
        from vitlab.checkpoints.official_npz import load_npz

        return load_npz(source, model=model)
    if format == "timm":
        from vitlab.checkpoints.timm import load_timm

        return load_timm(source, model=model)
    from vitlab.checkpoints.hf import load_hf

    return load_hf(source, model=model)


def adapt(model: nn.Module, *, image_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
          drop_pre_logits: bool = False) -> nn.Module:
    """Apply the explicit fine-tuning adaptations to a loaded model (see the module docstring). Works for the
    Vision Transformer and for any vitlab model with a ``config`` (``replace``, ``num_classes``, ``width``) and a
    ``head``, e.g. the ResNet classifier."""
    if image_size is None and num_classes is None and not drop_pre_logits:
        return model
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "replace") or not hasattr(model, "head"):
        raise ValueError(f"image_size / num_classes / drop_pre_logits need a vitlab model with a config and a "
                         f"head, not {type(model).__name__}")
    if image_size is not None and to_hw(image_size) != to_hw(cfg.image_size):
        if isinstance(model, VisionTransformer):
            # The official resize: bilinear with aligned corners on the grid, class slot kept apart.
            model.set_image_size(image_size)
        else:
            # No position embedding (the ResNet classifier is fully convolutional): only the config changes.
            model.config = cfg.replace(image_size=image_size)
        cfg = model.config
    representation = getattr(cfg, "representation_size", None)
    new_head = drop_pre_logits and representation is not None
    if new_head:
        model.pre_logits = None
        cfg = cfg.replace(representation_size=None)
    if num_classes is not None and num_classes != cfg.num_classes:
        cfg = cfg.replace(num_classes=num_classes)
        new_head = True
    if new_head:
        ref = next(model.parameters())
        head_in = getattr(cfg, "representation_size", None) or cfg.width
        if cfg.num_classes > 0:
            head: nn.Module = nn.Linear(head_in, cfg.num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)  # the paper's fine-tuning head: zero-initialised
            nn.init.zeros_(head.bias)
        else:
            head = nn.Identity()
        model.head = head
        if cfg.num_classes != model.config.num_classes:
            model.labels = None  # the old class names no longer describe the head
        logger.info("new zero-initialised head: %d -> %d classes", head_in, cfg.num_classes)
    model.config = cfg
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel`` wrappers, whose
    state-dict keys carry a prefix (``_orig_mod.``, ``module.``) that no checkpoint should contain."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def save(model: nn.Module, path: str | os.PathLike, *, format: Format = "vitlab",
         labels: list[str] | None = None) -> Path:
    """Write ``model`` in ``format``; ``labels`` default to ``model.labels``. Returns the written path (a file,
    or a directory for ``"hf"``). Every writer writes a temporary file and renames it, so an existing
    checkpoint is never left half-written."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    model = unwrap(model)
    if labels is None:
        labels = getattr(model, "labels", None)
    if format == "vitlab":
        from vitlab.checkpoints.native import save_native

        return save_native(model, path, labels=labels)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"format={format!r} holds Vision Transformers only, not {type(model).__name__}")
    if format == "npz":
        from vitlab.checkpoints.official_npz import save_npz

        return save_npz(model, path)
    if format == "timm":
        from vitlab.checkpoints.timm import save_timm

        return save_timm(model, path)
    from vitlab.checkpoints.hf import save_hf

    return save_hf(model, path, labels=labels)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, src_format: Format | None = None,
            dst_format: Format = "vitlab", model: ModelSpec = None, image_size: int | tuple[int, int] | None = None,
            num_classes: int | None = None, progress: bool = False) -> Path:
    """Load ``src`` and write it to ``dst`` in ``dst_format`` (what ``vitlab convert`` runs); ``progress`` shows
    a bar over the bytes read from the source."""
    from vitlab.checkpoints.io import read_progress

    local = not (isinstance(src, str) and src.startswith(HUB_PREFIX)) and Path(src).exists()
    with read_progress(src, enabled=progress and local):
        net = load(src, format=src_format, model=model, image_size=image_size, num_classes=num_classes)
    return save(net, dst, format=dst_format)
