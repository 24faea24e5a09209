"""timm Vision Transformer state dicts (``.safetensors``, or ``.pth``/``.bin`` read with
``torch.load(weights_only=True)``), including the hybrid ``vit_base_r50_s16_*`` family and GAP models.

vitlab's parameter names are timm's, so the conversion is an identity on keys plus checks: what timm can express
but the paper's model cannot (``norm_pre``, ``fc_norm`` after pooling, register tokens, layer scale, q/k norm,
attention pooling) is refused by name, and ``no_embed_class`` (the class token gets no position embedding) becomes
a zero class slot. The numerics are timm's: exact (erf) GELU, LayerNorm eps 1e-6, and in the hybrid's ResNet the
weight standardisation ``(w - mean) / sqrt(var + 1e-8)`` (``StdConv2dSame(eps=1e-8)`` via ``F.batch_norm``) and
``GroupNormAct`` eps 1e-5 -- not the official ``(w - mean) / (std + 1e-5)`` and 1e-6.

A fused qkv weight does not tell the number of heads, so a bare state dict needs ``model="ViT-B/16"`` (or
``model={"num_heads": 12}``); a hub directory's ``config.json`` names the timm architecture, which decides it.
Export writes the same keys; timm loads it into ``VisionTransformer(..., class_token=True)`` for token models and
``(..., class_token=False, global_pool="avg", fc_norm=False)`` for GAP models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitlab.checkpoints.build import count_stage_units, model_from_state_dict, resolve_config
from vitlab.checkpoints.io import read_weights
from vitlab.checkpoints.strict import CheckpointError
from vitlab.io import atomic_write
from vitlab.model.config import ViTConfig
from vitlab.model.vit import VisionTransformer

logger = logging.getLogger(__name__)

NUMERICS: dict[str, Any] = {"gelu": "exact", "norm_eps": 1e-6}
RESNET_NUMERICS: dict[str, Any] = {"ws_eps": 1e-8, "ws_eps_in_sqrt": True, "gn_eps": 1e-5}
BACKBONE = "patch_embed.backbone."
# timm parameters that have no counterpart in the paper's model, with the reason given to the user.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"^norm_pre\.", "a LayerNorm before the encoder (pre_norm=True, CLIP-style)"),
    (r"^fc_norm\.", "a LayerNorm after pooling (fc_norm); the paper's GAP normalises before pooling "
                    "(timm: fc_norm=False)"),
    (r"^reg_token$", "register tokens"),
    (r"^attn_pool\.", "attention pooling (MAP head)"),
    (r"\.ls[12]\.gamma$", "layer scale (init_values)"),
    (r"\.attn\.[qk]_norm\.", "q/k normalisation (qk_norm)"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "extra norms inside attention/MLP (scale_attn_norm / scale_mlp_norm)"),
    (r"^patch_embed\.norm\.", "a norm after the patch embedding (embed_norm_layer)"),
    (r"^head\.fc\.|^head\.norm\.", "a non-linear classifier head"),
    (r"^patch_embed\.backbone\.norm\.", "a pre-activation ResNet (timm preact=True)"),
)
# timm architecture names (hub config.json) -> vitlab names.
_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
_VIT_ARCH = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")
_HYBRID_ARCH = {"vit_base_r50_s16": "R50+ViT-B/16", "vit_large_r50_s32": "R50+ViT-L/32",
                "vit_small_r26_s32": "R26+ViT-S/32", "vit_base_r26_s32": "R26+ViT-B/32"}


def vitlab_name(architecture: str) -> str:
    """The vitlab model name of a timm architecture, e.g. ``vit_base_patch16_224`` -> ``ViT-B/16``."""
    m = _VIT_ARCH.match(architecture)
    if m:
        return f"ViT-{_SIZES[m.group(1)]}/{m.group(2)}"
    m = re.match(r"^(vit_\w+_r\d+_s\d+)_(\d+)$", architecture)
    if m and m.group(1) in _HYBRID_ARCH:
        return _HYBRID_ARCH[m.group(1)]
    raise CheckpointError(f"timm architecture {architecture!r} is not one of the paper's models that vitlab "
                          f"builds (vit_<tiny|small|base|large|huge>_patch<P>_<size>, {', '.join(_HYBRID_ARCH)})")


def check_supported(sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse timm parameters that the paper's model cannot compute, naming them."""
    problems: dict[str, list[str]] = {}
    for key in sd:
        for pattern, why in UNSUPPORTED:
            if re.search(pattern, key):
                problems.setdefault(why, []).append(key)
    if problems:
        lines = [f"{why}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" for why, keys in problems.items()]
        raise CheckpointError("timm model features outside the paper's ViT:\n  " + "\n  ".join(lines))


def derive_config(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, str]]:
    """(fields read from shapes, fields the shapes cannot tell) of a timm ViT state dict."""
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        found = ", ".join(list(sd)[:8]) or "no tensors"
        raise CheckpointError(f"not a timm ViT state dict: lacks patch_embed.proj.weight / blocks.0.attn.qkv.weight "
                              f"(found: {found})")
    width, cin, kh, kw = sd["patch_embed.proj.weight"].shape
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    fields: dict[str, Any] = dict(
        width=width, depth=depth, in_channels=cin, patch_size=kh if kh == kw else (kh, kw),
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        classifier="token" if "cls_token" in sd else "gap", qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )
    if "blocks.0.mlp.fc1.weight" in sd:
        fields["mlp_dim"] = sd["blocks.0.mlp.fc1.weight"].shape[0]
    unknown = {"num_heads": "a fused qkv weight does not tell how many heads share it"}
    stride = 1
    if BACKBONE + "stem.conv.weight" in sd:
        from vitlab.model.config import ResNetConfig

        layers = count_stage_units(lambda s, u: f"{BACKBONE}stages.{s}.blocks.{u}.conv1.weight" in sd)
        root, cin = sd[BACKBONE + "stem.conv.weight"].shape[:2]
        backbone = ResNetConfig(layers=layers, width_factor=root / 64)
        fields.update(backbone=backbone, in_channels=cin)
        stride = backbone.stride
    if "pos_embed" in sd:
        tokens = sd["pos_embed"].shape[1]
        prefix = 1 if "cls_token" in sd and not _is_square(tokens) else 0  # no_embed_class: no class slot
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            fields["image_size"] = side * kh * stride if kh == kw else (side * kh * stride, side * kw * stride)
        else:
            unknown["image_size"] = f"the position embedding holds {tokens - prefix} positions, not a square grid"
    else:
        fields["pos_embed"] = "none"
        unknown["image_size"] = "there is no position embedding to read the grid from"
    return fields, unknown


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def timm_to_vitlab(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """timm state dict -> vitlab state dict: the same keys; ``no_embed_class`` gets a zero class slot."""
    check_supported(sd)
    out = dict(sd)
    pos = out.get("pos_embed")
    if pos is not None and config.classifier == "token" and pos.shape[1] == config.num_patches:
        # timm's no_embed_class adds the class token after the position embedding: its slot is zero.
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    return out


def vitlab_to_timm(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """vitlab state dict -> timm state dict (same keys; only what timm's VisionTransformer can hold)."""
    if config.representation_size is not None:
        raise ValueError("timm's VisionTransformer has no pre-logits layer; load with drop_pre_logits=True and "
                         "a new head, or export to format='npz' or 'hf'")
    if config.pos_embed not in ("learned-1d", "none"):
        raise ValueError(f"timm's VisionTransformer has a learned 1D position embedding; pos_embed="
                         f"{config.pos_embed!r} cannot be written to it")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def read_hub_config(directory: Path) -> dict[str, Any]:
    """A timm hub directory's config.json (``architecture``, ``num_classes``, ``pretrained_cfg``...)."""
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: unreadable timm config ({e})") from None


def _spec_from_hub_config(directory: Path, model: Any) -> tuple[Any, str | None]:
    """(model spec, timm global_pool) from a timm hub directory's config.json."""
    config = read_hub_config(directory)
    if "architecture" not in config:
        raise CheckpointError(f"{directory / 'config.json'}: no 'architecture'; not a timm hub config")
    args = config.get("model_args") or {}
    pool = args.get("global_pool", config.get("global_pool"))
    if pool not in (None, "token", "avg", ""):
        raise CheckpointError(f"{directory}: timm global_pool={pool!r} is not the paper's token or GAP classifier")
    return (model if model is not None else vitlab_name(config["architecture"])), pool


def _weights_in(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"{directory}: has config.json but no weights (expected model.safetensors or "
                          f"pytorch_model.bin)")


def load_timm(source: str | os.PathLike | Mapping[str, torch.Tensor], model: Any = None,
              source_name: str | None = None) -> VisionTransformer:
    """A timm state dict (file, hub directory, or mapping) as a vitlab model with timm's numerics."""
    pool, label_names = None, None
    if isinstance(source, Mapping):
        sd, name = dict(source), source_name or "<state dict>"
    else:
        path = Path(source)
        if path.is_dir():
            model, pool = _spec_from_hub_config(path, model)
            label_names = read_hub_config(path).get("label_names")
            path = _weights_in(path)
        sd, name = read_weights(path), str(path)
    # A state dict cannot say how timm pooled; a hub config can, and must agree with the paper's classifiers.
    if pool == "avg" and "cls_token" in sd:
        raise CheckpointError(f"{name}: timm averages the patch tokens of a model with a class token "
                              f"(global_pool='avg'); the paper's GAP model has no class token")
    if pool == "token" and "cls_token" not in sd:
        raise CheckpointError(f"{name}: config says global_pool='token' but the weights have no cls_token")
    try:
        fields, unknown = derive_config(sd)
        check_supported(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    config = resolve_config(model, fields, unknown, NUMERICS, name, RESNET_NUMERICS)
    net = model_from_state_dict(config, timm_to_vitlab(sd, config), name)
    # timm hub configs may carry the class names (``label_names``).
    ok = isinstance(label_names, list) and len(label_names) == config.num_classes
    net.labels = [str(x) for x in label_names] if ok else None  # type: ignore[union-attr]
    return net


def save_timm(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Write timm keys to ``.safetensors`` (or a tensors-only ``.pth``/``.bin``, by extension)."""
    cfg = model.config
    if cfg.gelu != "exact":
        logger.warning("timm's ViT computes exact GELU; this model uses gelu=%r, so timm will compute slightly "
                       "different outputs", cfg.gelu)
    sd = vitlab_to_timm(model.state_dict(), cfg)
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return atomic_write(path, lambda tmp: torch.save(sd, tmp))
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
