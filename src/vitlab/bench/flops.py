"""Forward FLOPs per image of a Vision Transformer (paper Sec. 4.1 and Fig. 5 compare models by pre-training
compute; this is the per-image forward cost that such comparisons and the benchmark's MFU are built on).

Convention: one multiply-add is 2 FLOPs, and only matrix products are counted: the patch embedding (or the hybrid's
ResNet convolutions plus its 1x1 projection), the qkv projection, the attention scores ``q k^T``, the attention
applied to the values, the output projection, both MLP layers, the pre-logits layer and the head.

Excluded, because they are element-wise or reductions and together cost well under 1% of a ViT-B/16 forward:
LayerNorm/GroupNorm, softmax, GELU/ReLU/tanh, bias additions, residual additions, the position embedding, the
attention scaling, the hybrid's weight standardisation and max-pool, and pooling. This matches what
``torch.utils.flop_counter.FlopCounterMode`` counts, which the tests use as an independent reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitlab.model.config import ResNetConfig, ViTConfig


def _same_out(size: int, stride: int) -> int:
    """Output size of a TF "SAME" padded conv/pool: ceil(in / stride)."""
    return math.ceil(size / stride)


def _conv_flops(h_out: int, w_out: int, c_in: int, c_out: int, k: int) -> int:
    return 2 * h_out * w_out * c_out * c_in * k * k


def backbone_flops(cfg: ResNetConfig, image_hw: tuple[int, int], in_channels: int = 3) -> tuple[int, tuple[int, int]]:
    """Convolution FLOPs of the hybrid's ResNet for one image, and the (h, w) of its output feature map."""
    h, w = image_hw
    root = cfg.root_width
    h, w = _same_out(h, 2), _same_out(w, 2)  # 7x7/2 root conv
    total = _conv_flops(h, w, in_channels, root, 7)
    h, w = _same_out(h, 2), _same_out(w, 2)  # 3x3/2 max-pool (not counted)
    channels = root
    for i, units in enumerate(cfg.layers):
        mid = root * 2**i
        out = mid * 4
        for u in range(units):
            stride = (1 if i == 0 else 2) if u == 0 else 1
            ho, wo = _same_out(h, stride), _same_out(w, stride)
            if stride != 1 or channels != out:  # projection shortcut
                total += _conv_flops(ho, wo, channels, out, 1)
            total += _conv_flops(h, w, channels, mid, 1)  # conv1 runs before the stride
            total += _conv_flops(ho, wo, mid, mid, 3)
            total += _conv_flops(ho, wo, mid, out, 1)
            h, w, channels = ho, wo, out
    return total, (h, w)


def _encoder_matmuls(cfg: ViTConfig, batch: int, c_in: int, grid_hw: tuple[int, int]) -> list[tuple[int, ...]]:
    """(count, b, m, k, n) of every matmul after the pixels (or a hybrid's feature map of ``c_in`` channels on
    ``grid_hw``): patch projection, qkv, q kᵀ, p v, output projection, the MLP's two layers, the head."""
    ph, pw = cfg.patch_hw
    n = (grid_hw[0] // ph) * (grid_hw[1] // pw)
    t = n + cfg.num_prefix_tokens
    D, M, L, H = cfg.width, cfg.mlp_dim, cfg.depth, cfg.num_heads
    hd = D // H
    shapes = [(1, 1, batch * n, c_in * ph * pw, D), (L, 1, batch * t, D, 3 * D),
              (L, batch * H, t, hd, t), (L, batch * H, t, t, hd), (L, 1, batch * t, D, D),
              (L, 1, batch * t, D, M), (L, 1, batch * t, M, D)]
    head_in = D
    if cfg.representation_size:
        shapes.append((1, 1, batch, D, cfg.representation_size))
        head_in = cfg.representation_size
    shapes.append((1, 1, batch, head_in, cfg.num_classes))
    return shapes


def flops_breakdown(config: ViTConfig) -> dict[str, int]:
    """Forward FLOPs per image by component (keys: embed, qkv, attn_scores, attn_values, attn_proj, mlp, head)."""
    cfg = config
    if cfg.backbone is not None:
        embed, grid = backbone_flops(cfg.backbone, cfg.image_hw, cfg.in_channels)
        c_in = cfg.backbone.out_channels
    else:
        embed, grid, c_in = 0, cfg.image_hw, cfg.in_channels
    f = [2 * count * b * m * k * n for count, b, m, k, n in _encoder_matmuls(cfg, 1, c_in, grid)]
    return {"embed": embed + f[0], "qkv": f[1], "attn_scores": f[2], "attn_values": f[3], "attn_proj": f[4],
            "mlp": f[5] + f[6], "head": sum(f[7:])}


def matmul_shapes(config: ViTConfig, batch: int) -> list[tuple[int, int, int, int, int]]:
    """Every matrix multiply of one forward of ``batch`` images as (count, b, m, k, n): ``count`` times a batch of
    ``b`` (m x k) @ (k x n) products. The patch projection, qkv, output projection, MLP and head are Dense layers
    over all tokens (b = 1); q kᵀ and p v run per image and head. No hybrid backbone (its convolutions are not
    listed). What ``scripts/dev/gemm_ceiling.py`` times; :func:`flops_breakdown` counts the same list."""
    if config.backbone is not None:
        raise ValueError("matmul_shapes lists plain ViTs only (a hybrid's ResNet convolutions are not matmuls here)")
    return _encoder_matmuls(config, batch, config.in_channels, config.image_hw)


def count_flops(model: ViTConfig | nn.Module, input_size: tuple[int, ...] | None = None) -> int:
    """Forward FLOPs per image (multiply-add = 2) of a ``ViTConfig``, computed analytically.

    Any other ``nn.Module`` (e.g. a ResNet classifier) is measured with ``FlopCounterMode`` on one zero input of
    ``input_size`` = (C, H, W) (default (3, 224, 224)); a ``VisionTransformer`` uses its config.
    """
    if isinstance(model, ViTConfig):
        return sum(flops_breakdown(model).values())
    config = getattr(model, "config", None)
    if isinstance(config, ViTConfig) and input_size is None:
        return count_flops(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops expects a ViTConfig or an nn.Module, got {type(model).__name__}")
    return measure_flops(model, input_size or (3, 224, 224))


def measure_flops(model: nn.Module, input_size: tuple[int, ...], **forward_kwargs: Any) -> int:
    """Matmul/conv FLOPs of one forward pass on a batch of one, counted by torch's ``FlopCounterMode``.

    The input is on the model's device (the meta device works and allocates nothing). CPU's fused attention
    kernel has no FLOP formula in torch, so attention runs through the math backend, whose batched matmuls are
    counted like any other; vitlab's fused oneDNN inference ops have none either and are switched off. A model
    with ``forward_features`` is counted through it and ``forward_head``: the nominal FLOPs that papers and timm
    quote, although ``VisionTransformer.forward`` skips the last block's non-class-token rows.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.model import fast

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad(), \
                fast.use("plain"):
            if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
                model.forward_head(model.forward_features(x, **forward_kwargs))
            else:
                model(x, **forward_kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
