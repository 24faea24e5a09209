"""The BiT-style ResNet that feeds the hybrid ViT (paper Sec. 3.1 "Hybrid Architecture"), following the official
``vit_jax/models_resnet.py``: weight-standardised convolutions, GroupNorm, bottleneck units with the stride on the
3x3 conv, and TensorFlow "SAME" padding everywhere. Parameter names follow timm's ResNetV2 (``stem.conv``,
``stages.S.blocks.U.conv1`` ...), so timm hybrids load with renames only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.model.config import ResNetConfig


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF "SAME" padding: output size ceil(in / stride), the odd pixel on the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


class StdConv2dSame(nn.Conv2d):
    """Conv2d without bias whose kernel is standardised per output channel over (in, kh, kw) at every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 eps: float = 1e-5, eps_in_sqrt: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=False)
        self.eps = eps
        self.eps_in_sqrt = eps_in_sqrt

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)  # population variance, as the official code
        if self.eps_in_sqrt:
            return (w - mean) / torch.sqrt(var + self.eps)
        return (w - mean) / (torch.sqrt(var) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride)


class Bottleneck(nn.Module):
    """conv1x1 -> GN -> ReLU -> conv3x3/stride -> GN -> ReLU -> conv1x1 -> GN, added to the (projected) input,
    then ReLU."""

    def __init__(self, in_channels: int, mid: int, stride: int, cfg: ResNetConfig) -> None:
        super().__init__()
        out = mid * 4
        conv = dict(eps=cfg.ws_eps, eps_in_sqrt=cfg.ws_eps_in_sqrt)
        self.downsample: Downsample | None = None
        if stride != 1 or in_channels != out:
            self.downsample = Downsample(in_channels, out, stride, cfg)
        self.conv1 = StdConv2dSame(in_channels, mid, 1, **conv)
        self.norm1 = nn.GroupNorm(cfg.num_groups, mid, eps=cfg.gn_eps)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride, **conv)
        self.norm2 = nn.GroupNorm(cfg.num_groups, mid, eps=cfg.gn_eps)
        self.conv3 = StdConv2dSame(mid, out, 1, **conv)
        self.norm3 = nn.GroupNorm(cfg.num_groups, out, eps=cfg.gn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(shortcut + y)


class Downsample(nn.Module):
    """The projection shortcut: a strided 1x1 standardised conv and GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, cfg: ResNetConfig) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride, eps=cfg.ws_eps, eps_in_sqrt=cfg.ws_eps_in_sqrt)
        self.norm = nn.GroupNorm(cfg.num_groups, out_channels, eps=cfg.gn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Stem(nn.Module):
    """7x7/2 standardised conv, GroupNorm, ReLU, 3x3/2 max-pool (padded with -inf, TF "SAME")."""

    def __init__(self, in_channels: int, cfg: ResNetConfig) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, cfg.root_width, 7, 2, eps=cfg.ws_eps, eps_in_sqrt=cfg.ws_eps_in_sqrt)
        self.norm = nn.GroupNorm(cfg.num_groups, cfg.root_width, eps=cfg.gn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class Stage(nn.Module):
    def __init__(self, in_channels: int, mid: int, units: int, stride: int, cfg: ResNetConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[Bottleneck(in_channels if i == 0 else mid * 4, mid, stride if i == 0 else 1, cfg) for i in range(units)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetBackbone(nn.Module):
    """Root plus stages; returns the last stage's (B, C, H/stride, W/stride) feature map."""

    def __init__(self, cfg: ResNetConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = Stem(in_channels, cfg)
        stages = []
        channels = cfg.root_width
        for i, units in enumerate(cfg.layers):
            mid = cfg.root_width * 2**i
            stages.append(Stage(channels, mid, units, 1 if i == 0 else 2, cfg))
            channels = mid * 4
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
