"""The standalone BiT-style ResNet classifier: the paper's convolutional baseline (Sec. 4.1 and 4.2 compare ViT
with BiT ResNets trained on the same data), built from the hybrid's backbone so both families share one code path.

Named stages mirror :class:`~vitlab.model.vit.VisionTransformer`:

    forward_features (root + stages)            -> (B, C, h, w) feature map
    -> forward_head (global average pool, zero-initialised linear head) -> (B, K)

The backbone is the post-activation ResNet of the official hybrids (every unit ends with a ReLU), so no final
normalisation is needed before pooling; BiT's own pre-activation ResNet-v2 adds a GroupNorm+ReLU there instead.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.model.config import ResNetClassifierConfig
from vitlab.model.resnet import ResNetBackbone


class ResNetClassifier(nn.Module):
    """ResNet backbone, global average pooling, linear head (BiT's zero-initialised head)."""

    def __init__(self, config: ResNetClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetBackbone(config.backbone, config.in_channels)
        width = self.backbone.out_channels
        self.head = nn.Linear(width, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He (fan-out) normal convolutions and unit GroupNorm, as the hybrid's backbone; a zero head as BiT, so
        training starts from uniform predictions."""
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> the last stage's feature map (B, C, ceil(H/s), ceil(W/s)), s = 4 * 2^(stages-1)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        return self.backbone(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C): global average pooling."""
        return features.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool; with ``pre_logits=True`` return the pooled features (the few-shot representation), else logits."""
        x = self.pool(features)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
