"""Attention rollout (paper Fig. 6 and Appendix D.8; Abnar & Zuidema, 2020) and raw per-layer attention maps.

Rollout follows information from the input tokens to the output through the residual stream: each layer's
attention is averaged over heads, the identity is added for the residual connection and the rows renormalised
(``0.5 * A + 0.5 * I``), and the layers are multiplied, ``R = Â_L ... Â_1``. Row ``q`` of ``R`` says how much of
token ``q``'s final state comes from each input token.

The map returned for an image is the class token's row of ``R`` restricted to the patch tokens (for GAP models,
which have no class token, the mean of all rows, i.e. the pooled output's dependence), renormalised to sum to 1
over the patches. Degenerate case: if that row puts no mass on any patch (e.g. every attention is the identity,
so the class token only ever sees itself: row 0 of R is one-hot on the class token), the map is all zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def rollout_matrix(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, T, T) joint attention ``Â_L ... Â_1`` with ``Â = (mean_heads(A) + I) / 2`` from (B, H, T, T) maps."""
    joint = None
    for a in maps:
        a = a.to(torch.float64).mean(dim=1)  # B, T, T
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint  # later layers act on the output of earlier ones
    if joint is None:
        raise ValueError("rollout_matrix: no attention maps given")
    return joint


def rollout_maps(maps: Sequence[torch.Tensor], grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(B, gh, gw) rollout maps summing to 1 (see the module docstring for the GAP and degenerate cases)."""
    joint = rollout_matrix(maps)
    p = num_prefix_tokens
    row = joint[:, 0] if p > 0 else joint.mean(dim=1)  # B, T
    patches = row[:, p:]  # B, N
    total = patches.sum(dim=-1, keepdim=True)
    patches = torch.where(total > 0, patches / total.clamp_min(1e-300), torch.zeros_like(patches))
    return patches.reshape(-1, *grid).float()  # B, gh, gw


def query_attention(maps: Sequence[torch.Tensor], query: int, grid: tuple[int, int],
                    num_prefix_tokens: int) -> torch.Tensor:
    """(B, depth, heads, gh, gw): raw attention of token ``query`` (an index into the T tokens, class token
    first) to every patch, per layer and head, before any renormalisation."""
    p = num_prefix_tokens
    rows = [a[:, :, query, p:] for a in maps]  # each B, H, N
    return torch.stack(rows, dim=1).reshape(rows[0].shape[0], len(rows), rows[0].shape[1], *grid).float()


@torch.inference_mode()
def attention_rollout(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(B, gh, gw) attention rollout of ``images`` (B, C, H, W) at the model's resolution, each map summing
    to 1; attention comes from ``model.attention_maps`` (the explicit path, valid for SDPA models too)."""
    cfg = model.config
    return torch.cat([rollout_maps(model.attention_maps(x), cfg.grid_size, cfg.num_prefix_tokens)
                      for x in images.split(batch_size)])
