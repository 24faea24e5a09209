"""Position-embedding similarity (Fig. 7 centre) and its Spearman correlation with grid distance, against NumPy
and SciPy (test-time reference only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tests.analysis.reference import random_model
from vitlab.analysis import pos_embed_similarity, pos_embed_topology, rankdata, spearman


def test_similarity_matches_numpy_loops() -> None:
    model = random_model(image_size=(12, 16), patch_size=4)  # 3 x 4 grid
    sim = pos_embed_similarity(model)
    assert sim.shape == (12, 3, 4)
    pos = model.pos_embed.detach().double().numpy()[0, 1:]  # grid slots, class slot dropped
    for i in range(12):
        for j in range(12):
            cos = pos[i] @ pos[j] / (np.linalg.norm(pos[i]) * np.linalg.norm(pos[j]))
            assert sim[i, j // 4, j % 4].item() == pytest.approx(cos, abs=1e-6)


@pytest.mark.parametrize("kind", ["learned-2d", "sincos-2d"])
def test_other_embeddings_have_no_class_slot(kind: str) -> None:
    model = random_model(pos_embed=kind, image_size=16, patch_size=4)
    sim = pos_embed_similarity(model)
    assert sim.shape == (16, 4, 4)
    torch.testing.assert_close(torch.diagonal(sim.reshape(16, 16)), torch.ones(16))


def test_gap_model_and_no_embedding() -> None:
    assert pos_embed_similarity(random_model(classifier="gap")).shape == (16, 4, 4)
    with pytest.raises(ValueError, match="no position embedding"):
        pos_embed_similarity(random_model(pos_embed="none"))


def test_rankdata_and_spearman_match_scipy() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (200,), generator=g).double()  # many ties
    y = x + torch.randn(200, generator=g, dtype=torch.float64) * 3
    np.testing.assert_allclose(rankdata(x).numpy(), stats.rankdata(x.numpy()))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_topological_embedding_is_strongly_negative_random_is_near_zero() -> None:
    model = random_model(image_size=32, patch_size=4)  # 8 x 8 grid
    # A hand-made topological embedding: Gaussian bumps of the 2D position on a set of centres.
    gh, gw = model.config.grid_size
    centres = [(r, c) for r in np.linspace(0, gh - 1, 4) for c in np.linspace(0, gw - 1, 8)]
    emb = [[math.exp(-((r - cr) ** 2 + (c - cc) ** 2) / 4.0) for cr, cc in centres]
           for r in range(gh) for c in range(gw)]
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.tensor(emb)
    topo = pos_embed_topology(model)
    assert topo["spearman"] < -0.9
    assert topo["pairs"] == 64 * 63 // 2
    assert topo["mean_similarity"][0] > topo["mean_similarity"][-1]  # near pairs more similar than far ones
    # the official N(0, 0.02) initialisation knows nothing of the grid
    fresh = random_model(image_size=32, patch_size=4)
    fresh.reset_parameters()
    assert abs(pos_embed_topology(fresh)["spearman"]) < 0.1


def test_topology_spearman_matches_scipy() -> None:
    model = random_model(image_size=20, patch_size=4)  # 5 x 5
    sim = pos_embed_similarity(model).reshape(25, 25).double().numpy()
    coords = np.array([(r, c) for r in range(5) for c in range(5)], dtype=float)
    s, d = [], []
    for i in range(25):
        for j in range(i + 1, 25):
            s.append(sim[i, j])
            d.append(np.linalg.norm(coords[i] - coords[j]))
    expected = stats.spearmanr(s, d).statistic
    assert pos_embed_topology(model)["spearman"] == pytest.approx(expected, abs=1e-9)
