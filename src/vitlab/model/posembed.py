"""Position embeddings resampled to a new patch grid, as pure tensor functions (paper Sec. 3.2, "Fine-tuning and
higher resolution"). ``VisionTransformer.set_image_size`` and the checkpoint loaders use them to change a model's
resolution for good; ``VisionTransformer.position_embedding(grid)`` samples the stored table inside ``forward``
when the training loop feeds a lower resolution for a while (gradients then reach the stored table)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

InterpolationMode = str  # "bilinear" (default, equals the official scipy zoom(order=1)) or "bicubic"


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: InterpolationMode = "bilinear",
    align_corners: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) position embedding to ``new_grid``; prefix (class) slots are kept apart.

    The official code resizes with ``scipy.ndimage.zoom(order=1)``, which maps grid corners onto grid corners:
    that is bilinear interpolation with ``align_corners=True`` (``False`` differs by ~1e-2 on the fixtures).
    The computation runs in float32 (float64 for float64 input) and the result keeps the input dtype.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, width), got {tuple(pos_embed.shape)}")
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from {n} patch positions; pass old_grid=(gh, gw)")
        old_grid = (side, side)
    gh, gw = old_grid
    if gh * gw != n:
        raise ValueError(f"old_grid={old_grid} holds {gh * gw} positions but pos_embed has {n}")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed
    dtype = pos_embed.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    x = grid.to(work).reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # 1, D, gh, gw
    x = F.interpolate(x, size=new_grid, mode=mode, align_corners=align_corners)
    x = x.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(dtype)  # 1, gh'*gw', D
    return torch.cat([prefix, x], dim=1)


def resample_axis_embed(embed: torch.Tensor, new_len: int, align_corners: bool = True) -> torch.Tensor:
    """Linear resampling of a (1, L, D) per-axis embedding (the rows or columns of ``learned-2d``) to new_len."""
    if embed.shape[1] == new_len:
        return embed
    x = embed.float().transpose(1, 2)  # 1, D, L
    x = F.interpolate(x, size=new_len, mode="linear", align_corners=align_corners)
    return x.transpose(1, 2).to(embed.dtype)
