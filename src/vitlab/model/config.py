"""Typed configuration of the Vision Transformer family and the table of named sizes.

The sizes come from Table 1 of Dosovitskiy et al. (2020), "An Image is Worth 16x16 Words", plus the Ti and S
sizes of Touvron et al. (2021) that the official AugReg checkpoints use. A model is named in the paper's own
notation, e.g. ``"ViT-B/16"`` or ``"R50+ViT-B/16"``, and decoded by :func:`config_from_name`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from vitlab.typecheck import check_types

Classifier = Literal["token", "gap"]
PosEmbed = Literal["learned-1d", "learned-2d", "sincos-2d", "none"]
Gelu = Literal["exact", "tanh"]


def to_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image or patch size as (height, width)."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


@dataclass(frozen=True)
class ResNetConfig:
    """The BiT-style ResNet of the official hybrid models (vit_jax ``models_resnet.py``).

    Weight-standardised convolutions without bias, GroupNorm, bottleneck units with the stride on the 3x3 conv,
    TF "SAME" padding. The first stage has stride 1 (after the stride-4 root), each later stage stride 2.
    """

    layers: tuple[int, ...] = (3, 4, 9)
    width_factor: float = 1.0
    num_groups: int = 32
    # The official code standardises as (w - mean) / (std + 1e-5) and uses GroupNorm eps 1e-6; timm standardises
    # as (w - mean) / sqrt(var + eps) with its own epsilons. Both are kept so either checkpoint computes exactly.
    ws_eps: float = 1e-5
    ws_eps_in_sqrt: bool = False
    gn_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"ResNetConfig.layers must be a non-empty tuple of positive unit counts, got {self.layers}")
        if self.width_factor <= 0:
            raise ValueError(f"ResNetConfig.width_factor must be positive, got {self.width_factor}")
        if self.root_width % self.num_groups:
            raise ValueError(
                f"ResNet root width {self.root_width} is not divisible by num_groups={self.num_groups}"
            )

    @property
    def root_width(self) -> int:
        return int(64 * self.width_factor)

    @property
    def out_channels(self) -> int:
        """Channels of the last stage: 4x the bottleneck width, doubled per stage."""
        return self.root_width * 4 * 2 ** (len(self.layers) - 1)

    @property
    def stride(self) -> int:
        """Total downsampling: 4 for the root (conv /2, max-pool /2), then 2 per stage after the first."""
        return 4 * 2 ** (len(self.layers) - 1)


class JsonConfig:
    """JSON round trip shared by the model configs (checkpoints store a config as JSON). Nested ``backbone`` dicts
    become ``ResNetConfig`` in each config's ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Any:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ViTConfig(JsonConfig):
    """Every architectural choice of a Vision Transformer.

    Defaults follow the official implementation (tanh GELU, LayerNorm eps 1e-6, qkv bias, class token, learned 1D
    position embedding). ``patch_size`` is measured on the model input, or on the backbone's feature map for a
    hybrid (1 for every official hybrid), so the effective patch is ``backbone.stride * patch_size``.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_channels: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    classifier: Classifier = "token"
    pos_embed: PosEmbed = "learned-1d"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    gelu: Gelu = "tanh"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    backbone: ResNetConfig | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", ResNetConfig(**self.backbone))
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid ViTConfig: {msg}")

        check_types(self)  # every field against its annotation (the Literals above included)
        for name in ("width", "depth", "num_heads", "mlp_dim", "in_channels"):
            if getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_classes < 0:
            fail(f"num_classes must be >= 0 (0 means no head), got {self.num_classes}")
        if self.width % self.num_heads:
            fail(f"width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.pos_embed == "learned-2d" and self.width % 2:
            fail(f"pos_embed='learned-2d' needs an even width (two halves of D/2), got width={self.width}")
        if self.pos_embed == "sincos-2d" and self.width % 4:
            fail(f"pos_embed='sincos-2d' needs width divisible by 4, got width={self.width}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.representation_size is not None and self.representation_size < 1:
            fail(f"representation_size must be None or positive, got {self.representation_size}")
        ih, iw = self.image_hw
        ph, pw = self.effective_patch_hw
        if min(ih, iw, ph, pw) < 1 or ih % ph or iw % pw:
            what = "the backbone stride times patch_size" if self.backbone else "patch_size"
            fail(
                f"image_size={self.image_size} must be divisible by {what} = ({ph}, {pw}); "
                f"allowed sizes are multiples of the patch, e.g. {ph * max(1, ih // ph)}"
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        return to_hw(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return to_hw(self.patch_size)

    @property
    def effective_patch_hw(self) -> tuple[int, int]:
        """The patch size measured in input pixels (the backbone's stride folded in for hybrids)."""
        s = self.backbone.stride if self.backbone else 1
        ph, pw = self.patch_hw
        return (ph * s, pw * s)

    @property
    def grid_size(self) -> tuple[int, int]:
        ih, iw = self.image_hw
        ph, pw = self.effective_patch_hw
        return (ih // ph, iw // pw)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        """1 for the class token of the ``token`` classifier, 0 for ``gap``."""
        return 1 if self.classifier == "token" else 0

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def replace(self, **overrides: Any) -> "ViTConfig":
        """A copy with some fields changed; unknown field names raise a ``ValueError``."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"unknown ViTConfig field(s) {sorted(unknown)}; allowed: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **overrides)



@dataclass(frozen=True)
class ResNetClassifierConfig(JsonConfig):
    """A standalone BiT-style ResNet classifier (the paper's CNN baseline, Kolesnikov et al. 2020 "BiT").

    The backbone is the hybrid's post-activation ResNet (:class:`ResNetConfig`); the head is global average
    pooling and a zero-initialised linear layer. ``image_size`` only documents the training resolution: the
    network is fully convolutional, and 32-pixel inputs work (the root /4 then /2 per later stage, 1x1 at the end).
    """

    image_size: int | tuple[int, int] = 224
    in_channels: int = 3
    num_classes: int = 1000
    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(layers=(3, 4, 6, 3)))

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", ResNetConfig(**self.backbone))
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if min(self.image_hw) < 1:
            raise ValueError(f"invalid ResNetClassifierConfig: image_size must be positive, got {self.image_size}")
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"invalid ResNetClassifierConfig: in_channels must be positive, got {self.in_channels!r}")
        if self.num_classes < 0:
            raise ValueError(f"invalid ResNetClassifierConfig: num_classes must be >= 0, got {self.num_classes}")

    @property
    def image_hw(self) -> tuple[int, int]:
        return to_hw(self.image_size)

    @property
    def width(self) -> int:
        """Channels of the pooled feature vector (the last stage's output)."""
        return self.backbone.out_channels

    @property
    def grid_size(self) -> tuple[int, int]:
        """Spatial size of the last feature map; TF "SAME" padding makes every stride step a ceil division."""
        h, w = self.image_hw
        for _ in range(len(self.backbone.layers) + 1):  # the root's two /2 steps and the later stages' one each
            h, w = -(-h // 2), -(-w // 2)
        return (h, w)

    def replace(self, **overrides: Any) -> "ResNetClassifierConfig":
        """A copy with some fields changed; ResNetConfig fields (``width_factor``, ``layers`` ...) go to the
        backbone; unknown names raise a ``ValueError``."""
        own = {f.name for f in dataclasses.fields(self)}
        deep = {f.name for f in dataclasses.fields(ResNetConfig)}
        unknown = set(overrides) - own - deep
        if unknown:
            raise ValueError(
                f"unknown ResNetClassifierConfig field(s) {sorted(unknown)}; allowed: {sorted(own | deep)}"
            )
        backbone_overrides = {k: overrides.pop(k) for k in list(overrides) if k in deep}
        if backbone_overrides:
            overrides["backbone"] = dataclasses.replace(overrides.get("backbone", self.backbone), **backbone_overrides)
        return dataclasses.replace(self, **overrides)



# Table 1 of the paper (Base, Large, Huge) and DeiT's Tiny and Small, which the AugReg checkpoints use:
# name -> (width, depth, mlp_dim, num_heads).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
PATCH_SIZES = (8, 14, 16, 32)

# Hybrids of the paper (Sec. 4.1) and the official repository. For R50+ViT-B/16 the official code removes stage 4
# of ResNet-50 and moves its blocks into stage 3 (3, 4, 9); the feature map is cut into 1x1 patches.
HYBRIDS: dict[str, tuple[int, ...]] = {
    "R50+ViT-B/16": (3, 4, 9),
    "R50+ViT-L/32": (3, 4, 6, 3),
    "R26+ViT-S/32": (2, 2, 2, 2),
    "R26+ViT-B/32": (2, 2, 2, 2),
}

_VIT_NAME = re.compile(r"^ViT-(Ti|S|B|L|H)/(\d+)$")

# The BiT ResNets (Kolesnikov et al. 2020, Sec. 2 and Table 6; the paper's CNN baselines, Sec. 4.1): ResNet-26 as in
# the R26 hybrids, ResNet-50/101/152 as in He et al. 2016; "xN" multiplies every width (root included), as BiT.
# depth -> units per stage.
RESNET_DEPTHS: dict[int, tuple[int, ...]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
RESNET_WIDTHS = (1, 2, 3, 4)
_RESNET_NAME = re.compile(r"^ResNet-(\d+)(?:x(\d+))?$")


def list_model_names() -> list[str]:
    names = [f"ViT-{size}/{patch}" for size in SIZES for patch in PATCH_SIZES]
    resnets = [f"ResNet-{d}" + (f"x{w}" if w > 1 else "") for d in RESNET_DEPTHS for w in RESNET_WIDTHS]
    return names + list(HYBRIDS) + resnets


def is_resnet_name(name: str) -> bool:
    """True for the standalone ResNet classifiers (``"ResNet-50"``, ``"ResNet-50x2"``), not the hybrids."""
    return _RESNET_NAME.match(name) is not None


def resnet_config_from_name(name: str, **overrides: Any) -> ResNetClassifierConfig:
    """Decode ``"ResNet-{26,50,101,152}[x{2,3,4}]"`` into a :class:`ResNetClassifierConfig`, then apply overrides
    (its own fields, or :class:`ResNetConfig` fields such as ``width_factor`` that go to the backbone)."""
    match = _RESNET_NAME.match(name)
    depth = int(match.group(1)) if match else None
    width = int(match.group(2) or 1) if match else None
    if depth not in RESNET_DEPTHS or width not in RESNET_WIDTHS or (match and match.group(2) == "1"):
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(list_model_names())}")
    base = ResNetClassifierConfig(backbone=ResNetConfig(layers=RESNET_DEPTHS[depth], width_factor=float(width)))
    return base.replace(**overrides)


def config_from_name(name: str, **overrides: Any) -> ViTConfig | ResNetClassifierConfig:
    """Decode a name like ``"ViT-B/16"`` or ``"R50+ViT-B/16"`` into a :class:`ViTConfig`, then apply overrides.

    ResNet names (``"ResNet-50x2"``) give a :class:`ResNetClassifierConfig` (see :func:`resnet_config_from_name`).
    """
    if is_resnet_name(name):
        return resnet_config_from_name(name, **overrides)
    if name in HYBRIDS:
        vit_name = name.split("+", 1)[1]
        size = _VIT_NAME.match(vit_name).group(1)  # type: ignore[union-attr]
        backbone = ResNetConfig(layers=HYBRIDS[name])
        patch = 1
    else:
        match = _VIT_NAME.match(name)
        if match is None or int(match.group(2)) not in PATCH_SIZES:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(list_model_names())}")
        size, patch = match.group(1), int(match.group(2))
        backbone = None
    width, depth, mlp_dim, heads = SIZES[size]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
        raise ValueError(
            f"unknown override(s) {sorted(unknown)} for {name!r}; "
            f"allowed: {[f.name for f in dataclasses.fields(ViTConfig)]}"
        )
    fields: dict[str, Any] = dict(
        image_size=224, patch_size=patch, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, backbone=backbone
    )
    fields.update(overrides)
    return ViTConfig(**fields)

