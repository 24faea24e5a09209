"""Mean attention distance (paper Fig. 7 right, Appendix D.7).

For every layer and head: the image-space distance between a query patch and the key patches, weighted by the
attention probability, averaged over query patches and images. It plays the role of a CNN's receptive field size;
the paper finds that some heads attend to most of the image already in the lowest layers while others stay local,
and that the distance grows with depth.

Conventions (documented because implementations differ):
- Places are patch centres in pixels of the model input; for a hybrid the "patch" is the backbone's effective
  patch (stride x patch size). Distances are Euclidean.
- Only patch tokens count: the class token is neither a query nor a key here (it is not a place in the image).
  The attention a patch gives to the class token is dropped and the remaining weights renormalised, so each row
  is a distribution over places. With all attention on the class token a row carries no place; it then contributes
  distance 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def patch_centres(grid: tuple[int, int], patch_hw: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, 2) pixel coordinates (y, x) of the patch centres, row-major."""
    gh, gw = grid
    ph, pw = patch_hw
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) * ph
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) * pw
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([y.flatten(), x.flatten()], dim=1)


def patch_distances(grid: tuple[int, int], patch_hw: tuple[int, int]) -> torch.Tensor:
    """(N, N) pixel distances between patch centres."""
    c = patch_centres(grid, patch_hw)
    return torch.cdist(c, c)


def attention_distance(maps: Sequence[torch.Tensor], grid: tuple[int, int], patch_hw: tuple[int, int],
                       num_prefix_tokens: int) -> torch.Tensor:
    """Per-image mean attention distance from attention probabilities, (B, depth, heads).

    ``maps`` holds one (B, heads, T, T) tensor per layer, T = num_prefix_tokens + gh*gw.
    """
    dist = patch_distances(grid, patch_hw)
    p = num_prefix_tokens
    out = []
    for a in maps:
        a = a[..., p:, p:].to(torch.float64)  # B, H, N, N: patch queries to patch keys
        mass = a.sum(dim=-1)  # B, H, N
        weighted = (a * dist.to(a.device)).sum(dim=-1)  # B, H, N
        per_query = torch.where(mass > 0, weighted / mass.clamp_min(1e-300), torch.zeros_like(mass))
        out.append(per_query.mean(dim=-1))  # B, H
    return torch.stack(out, dim=1).float()  # B, depth, H


def model_patch_hw(model: nn.Module) -> tuple[int, int]:
    """The patch size in input pixels (the backbone's stride times the patch size for a hybrid)."""
    return tuple(model.config.effective_patch_hw)  # type: ignore[return-value]


@torch.inference_mode()
def mean_attention_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(depth, heads) mean attention distance in pixels of the model's input, averaged over ``images``
    (B, C, H, W) at the model's resolution, computed ``batch_size`` images at a time."""
    cfg = model.config
    per_image = [
        attention_distance(model.attention_maps(x), cfg.grid_size, model_patch_hw(model), cfg.num_prefix_tokens)
        for x in images.split(batch_size)
    ]
    return torch.cat(per_image).mean(dim=0)
