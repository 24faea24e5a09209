"""Principal components of the patch-embedding filters (paper Fig. 7 left).

The first layer of a ViT projects each flattened ``C x P x P`` patch with a ``D x (C*P*P)`` matrix. Treating its
D rows as samples, the paper shows the top 28 principal components of those filters as RGB patches; they resemble
plausible basis functions for a low-dimensional representation of each patch's fine structure.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class FilterPCA(NamedTuple):
    """``components`` (k, C, ph, pw): unit-norm principal directions in filter space, ordered by variance;
    ``explained_variance`` (k,): the fraction of the filters' total variance each component explains."""

    components: torch.Tensor
    explained_variance: torch.Tensor


def embedding_filters(model: nn.Module, k: int = 28) -> FilterPCA:
    """PCA of the patch-embedding filters of a (non-hybrid) ViT.

    The D filters (rows of the projection, each flattened to C*ph*pw values) are centred on their mean, and the
    right singular vectors of that matrix are the principal components. The sign of a singular vector is
    arbitrary; each component is flipped so that its entry of largest magnitude is positive, which makes the
    result deterministic. ``k`` is clipped to the number of available components.
    """
    if getattr(model.config, "backbone", None) is not None:
        raise ValueError(
            "embedding_filters: this is a hybrid model; its patch embedding acts on ResNet feature maps, not on "
            "image pixels, so its filters are not RGB patches (the paper's Fig. 7 shows a pure ViT)"
        )
    if k < 1:
        raise ValueError(f"embedding_filters: k must be positive, got {k}")
    weight = model.patch_embed.proj.weight.detach().to(torch.float64)  # D, C, ph, pw
    D, C, ph, pw = weight.shape
    flat = weight.reshape(D, C * ph * pw)  # D samples of dimension C*ph*pw
    centred = flat - flat.mean(dim=0, keepdim=True)
    # Full SVD of a (D, C*P*P) matrix is small even for ViT-H/14 (1280 x 588).
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: r, C*ph*pw
    variance = s.square()
    ratio = variance / variance.sum().clamp_min(torch.finfo(variance.dtype).tiny)
    k = min(k, vh.shape[0])
    comps = vh[:k]
    idx = comps.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(comps.gather(1, idx))
    signs[signs == 0] = 1.0
    comps = comps * signs
    return FilterPCA(comps.reshape(k, C, ph, pw).float(), ratio[:k].float())
