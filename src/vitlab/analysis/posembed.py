"""Position-embedding similarity (paper Fig. 7 centre) and how strongly it encodes the 2D grid.

The paper's observation: a *1D* learned position embedding ends up encoding the image's 2D topology, i.e. close
patches get similar embeddings, and row/column structure appears. ``pos_embed_similarity`` returns the cosine
similarity maps the paper draws; ``pos_embed_topology`` condenses them into one number, the Spearman rank
correlation between similarity and 2D grid distance (strongly negative when the embedding is topological, about
zero for the random embedding at initialisation).
"""

from __future__ import annotations

import torch
from torch import nn


def grid_positions(model: nn.Module) -> torch.Tensor:
    """(gh*gw, D) embeddings of the grid positions, row-major, without the class slot."""
    cfg = model.config
    pos = model.position_embedding()
    if pos is None:
        raise ValueError("pos_embed_similarity: the model has no position embedding (pos_embed='none')")
    pos = pos.detach()[0]  # T, D
    gh, gw = cfg.grid_size
    if cfg.pos_embed == "learned-1d":
        pos = pos[cfg.num_prefix_tokens:]  # the class slot is not a place in the image
    if pos.shape[0] != gh * gw:
        raise ValueError(f"position embedding has {pos.shape[0]} grid slots, expected {gh}x{gw}")
    return pos


def pos_embed_similarity(model: nn.Module) -> torch.Tensor:
    """(gh*gw, gh, gw): entry ``[i, r, c]`` is the cosine similarity between the embedding of grid position
    ``i`` (row-major) and that of position ``(r, c)``."""
    gh, gw = model.config.grid_size
    pos = grid_positions(model).to(torch.float64)
    unit = pos / pos.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T  # N, N
    return sim.reshape(gh * gw, gh, gw).float()  # N, gh, gw


def grid_distances(grid: tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean distances between grid cells, in cells, row-major order."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # N, 2
    return torch.cdist(coords, coords)


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1D tensor, ties getting the average of the ranks they span (scipy's ``average``)."""
    x = x.flatten()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    # A group of tied values occupying sorted positions s..s+c-1 (0-based) gets the mean rank s + (c + 1) / 2.
    starts = torch.cumsum(counts, 0) - counts
    group_rank = starts.to(torch.float64) + (counts.to(torch.float64) + 1.0) / 2.0
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (tie-averaged) ranks."""
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"spearman: need two inputs of equal size >= 2, got {x.numel()} and {y.numel()}")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)


def pos_embed_topology(model: nn.Module, similarity: torch.Tensor | None = None) -> dict:
    """How 2D the embedding is: Spearman correlation between cosine similarity and grid distance over all
    unordered pairs of distinct grid positions, plus the mean similarity at each distinct distance."""
    grid = model.config.grid_size
    sim = pos_embed_similarity(model) if similarity is None else similarity
    n = grid[0] * grid[1]
    sim = sim.reshape(n, n).to(torch.float64)
    dist = grid_distances(grid)
    iu = torch.triu_indices(n, n, offset=1)  # each pair once, self-pairs (similarity 1, distance 0) excluded
    s, d = sim[iu[0], iu[1]], dist[iu[0], iu[1]]
    levels, inverse = torch.unique(d, return_inverse=True)
    sums = torch.zeros_like(levels).index_add_(0, inverse, s)
    counts = torch.zeros_like(levels).index_add_(0, inverse, torch.ones_like(s))
    return {
        "spearman": spearman(s, d),
        "pairs": int(s.numel()),
        "distance_cells": [round(float(v), 4) for v in levels],
        "mean_similarity": [round(float(v), 4) for v in sums / counts],
    }
