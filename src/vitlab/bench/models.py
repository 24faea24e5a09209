"""The models the benchmark compares: a vitlab ``ViTConfig`` and timm's matching ``VisionTransformer`` built from
it, holding the same weights, so that both compute the same function (paper Sec. 3.1 ViT, no hybrid).

timm is a benchmark-time reference only: it is imported inside :func:`build_timm`, never by the model code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.model.config import ViTConfig, config_from_name

log = logging.getLogger(__name__)

# The keys of the benchmark's model table besides the named models: the CIFAR-sized model of the training recipe.
CIFAR_KEY = "cifar"


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: a label, its config, and the batch sizes used for each measurement."""

    key: str
    config: ViTConfig
    infer_batch: int
    train_batch: int


def cifar_config() -> ViTConfig:
    """The CIFAR-sized model of ``presets/small-scratch.yaml`` (the training recipe), for 10 classes.

    The recipe's fixed sin-cos position table is added exactly as a learned one would be; timm has no sin-cos
    option, so the benchmark uses a learned table (same compute) to keep both libraries on the same function.
    """
    try:
        from vitlab.train.config import load_config

        preset = load_config("small-scratch")
        overrides = {**preset.model_overrides, "pos_embed": "learned-1d"}
        return config_from_name(preset.model, num_classes=10, image_size=preset.image_size, **overrides)
    except (ImportError, FileNotFoundError, ValueError) as e:  # the preset is owned by the training code
        log.warning("small-scratch preset unavailable (%s); using patch 4, 32 px, width 128, depth 4, 4 heads", e)
        return ViTConfig(image_size=32, patch_size=4, width=128, depth=4, num_heads=4, mlp_dim=256, num_classes=10,
                         classifier="gap")


# Batch sizes chosen so that one call is long enough to time (>~0.1 s) and the full CPU run stays within minutes.
_DEFAULT_BATCH = {"ViT-Ti/16": (32, 32), "ViT-S/16": (16, 16), "ViT-B/16": (8, 8), CIFAR_KEY: (128, 128)}


def bench_model(key: str, *, gelu: str | None = "exact", infer_batch: int | None = None,
                train_batch: int | None = None) -> BenchModel:
    """A named model (``"ViT-B/16"``), or ``"cifar"`` for the training recipe's model.

    ``gelu="exact"`` makes the named models compute what timm computes by default (erf GELU); the CIFAR model
    keeps the recipe's own GELU and timm is configured to match it. ``gelu=None`` keeps every config's own choice.
    """
    if key == CIFAR_KEY:
        config = cifar_config()
    else:
        config = config_from_name(key)
        if gelu is not None:
            config = config.replace(gelu=gelu)
    bi, bt = _DEFAULT_BATCH.get(key, (16, 16))
    return BenchModel(key, config, infer_batch or bi, train_batch or bt)


def timm_kwargs(config: ViTConfig) -> dict:
    """Arguments of timm's ``VisionTransformer`` that make it the same function as vitlab's model of ``config``."""
    if config.backbone is not None or config.pos_embed != "learned-1d" or config.representation_size:
        raise ValueError(
            "the timm comparison supports plain ViTs with a learned 1D position embedding and no pre-logits layer; "
            f"got backbone={config.backbone}, pos_embed={config.pos_embed!r}, "
            f"representation_size={config.representation_size}"
        )
    from functools import partial

    token = config.classifier == "token"
    return dict(
        img_size=config.image_hw, patch_size=config.patch_hw, in_chans=config.in_channels,
        num_classes=config.num_classes, embed_dim=config.width, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.width, qkv_bias=config.qkv_bias,
        class_token=token, global_pool="token" if token else "avg",
        # timm's "avg" pool would otherwise move the final LayerNorm after pooling; vitlab (and the paper's
        # official code) normalise the tokens, then average.
        fc_norm=False,
        norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
        act_layer=partial(nn.GELU, approximate="tanh" if config.gelu == "tanh" else "none"),
        drop_rate=config.dropout, attn_drop_rate=config.attention_dropout, proj_drop_rate=config.dropout,
        drop_path_rate=config.drop_path, weight_init="skip",
    )


def build_timm(config: ViTConfig) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError as e:  # pragma: no cover - timm is a test/bench dependency
        raise ImportError("the benchmark compares against timm: pip install timm") from e
    return TimmViT(**timm_kwargs(config))


def build_pair(config: ViTConfig, *, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(vitlab model, timm model) with the same random weights, both in eval mode."""
    from vitlab.model.vit import VisionTransformer

    torch.manual_seed(seed)
    ours = VisionTransformer(config)
    # The official init zeroes the head, which would make every output equal: give it weights to compare.
    with torch.no_grad():
        for p in ours.head.parameters():
            p.normal_(std=0.02)
    theirs = build_timm(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, config: ViTConfig, batch: int = 2) -> float:
    """Largest absolute difference of the two models' logits on one random batch (fp32)."""
    x = torch.randn(batch, config.in_channels, *config.image_hw, generator=torch.Generator().manual_seed(1))
    return float((a(x) - b(x)).abs().max())

