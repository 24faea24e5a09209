"""Initialisations for training from scratch on little data.

Mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", ICML 2023): the
attention weights of pre-trained ViTs show ``W_q^T W_k`` close to a positive multiple of the identity (a token
attends to tokens like itself, which through the position embedding means its neighbours) and ``W_v^T W_o^T``
close to a negative multiple. Starting there instead of from independent random matrices gives a small-data ViT
the locality a convolution has by construction, while the architecture stays the plain ViT.
"""

from __future__ import annotations

import torch
from torch import nn


def _factor(width: int, alpha: float, beta: float, rank: int, generator: torch.Generator) -> tuple:
    """Factors (L, R), L (width, rank) and R (rank, width), with L @ R the best rank-``rank`` approximation of
    ``alpha * Z + beta * I`` where Z is uniform with variance 1/width."""
    bound = (3.0 / width) ** 0.5
    target = alpha * (torch.rand(width, width, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    target += beta * torch.eye(width, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def mimetic_attention_init_(model: nn.Module, *, qk: tuple[float, float] = (0.7, 0.7),
                            vo: tuple[float, float] = (0.4, 0.4), generator: torch.Generator | None = None) -> None:
    """Re-initialise every attention layer of a :class:`~vitlab.model.VisionTransformer` in place.

    Per head, ``W_q^T W_k`` (width x width, rank head_dim) approximates ``qk[0] * Z + qk[1] * I``; per layer,
    ``W_v^T W_o^T`` approximates ``vo[0] * Z - vo[1] * I``. Defaults are the paper's values for ViT-Tiny.
    Biases are left as they are (zero from the standard initialisation).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed() % 2**63)
    for block in model.blocks:
        attn = block.attn
        width, heads, hd = attn.qkv.in_features, attn.num_heads, attn.head_dim
        w = attn.qkv.weight  # (3 * width, width): rows [q; k; v], head h owns rows h*hd:(h+1)*hd of each
        for h in range(heads):
            left, right = _factor(width, qk[0], qk[1], hd, g)
            # scores = x W_q^T W_k x^T, so W_q^T = left and W_k = right.
            w[h * hd:(h + 1) * hd].copy_(left.T)
            w[width + h * hd:width + (h + 1) * hd].copy_(right)
        left, right = _factor(width, vo[0], -vo[1], width, g)
        # output = x W_v^T W_o^T (heads concatenated), so W_v^T = left and W_o^T = right.
        w[2 * width:].copy_(left.T)
        attn.proj.weight.copy_(right.T)
