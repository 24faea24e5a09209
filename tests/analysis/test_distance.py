"""Mean attention distance (Fig. 7 right): hand-made attention matrices with known answers, and real models
against a direct loop over queries and keys on independently computed attention."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tests.analysis.reference import attention_probs, random_model
from vitlab.analysis import attention_distance, mean_attention_distance, patch_distances


def _brute_mean_pairwise(gh: int, gw: int, ph: int, pw: int) -> float:
    """Mean distance over all ordered pairs of patch centres (self-pairs included), by explicit loops."""
    centres = [((r + 0.5) * ph, (c + 0.5) * pw) for r in range(gh) for c in range(gw)]
    total = sum(math.dist(a, b) for a, b in itertools.product(centres, centres))
    return total / len(centres) ** 2


@pytest.mark.parametrize("prefix", [0, 1])
def test_all_mass_on_self_is_zero(prefix: int) -> None:
    grid, n = (3, 4), 12
    a = torch.eye(prefix + n).expand(2, 3, -1, -1)  # B=2, H=3
    d = attention_distance([a, a], grid, (8, 8), prefix)
    assert d.shape == (2, 2, 3)
    assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("grid,patch", [((4, 4), (16, 16)), ((3, 5), (8, 4)), ((14, 14), (16, 16))])
def test_uniform_attention_is_mean_pairwise_distance(grid: tuple[int, int], patch: tuple[int, int]) -> None:
    n = grid[0] * grid[1]
    a = torch.full((1, 2, n + 1, n + 1), 1.0 / (n + 1))  # uniform over class token and patches
    d = attention_distance([a], grid, patch, num_prefix_tokens=1)
    expected = _brute_mean_pairwise(*grid, *patch)
    torch.testing.assert_close(d, torch.full_like(d, expected), rtol=1e-6, atol=1e-5)


def test_neighbour_attention_known_value() -> None:
    # Every patch of a 1x3 row of 10-px patches attends half to the class token and half to its right neighbour
    # (the last one to itself): the class token is dropped and the rest renormalised, giving 10, 10, 0 -> 20/3.
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 1, 0], a[0, 0, 1, 2] = 0.5, 0.5
    a[0, 0, 2, 0], a[0, 0, 2, 3] = 0.5, 0.5
    a[0, 0, 3, 0], a[0, 0, 3, 3] = 0.5, 0.5
    a[0, 0, 0, 0] = 1.0
    d = attention_distance([a], (1, 3), (10, 10), num_prefix_tokens=1)
    assert d.item() == pytest.approx(20.0 / 3.0, rel=1e-6)


def test_patch_distances_in_pixels() -> None:
    d = patch_distances((2, 2), (16, 8))
    # cells (0,0) and (1,1): centres (8, 4) and (24, 12)
    assert d[0, 3].item() == pytest.approx(math.hypot(16, 8))
    assert d[0, 1].item() == pytest.approx(8.0)


def _loop_reference(probs: list[np.ndarray], gh: int, gw: int, ph: int, pw: int, prefix: int) -> np.ndarray:
    """(depth, heads) by explicit loops over images, layers, heads, queries and keys."""
    B, H = probs[0].shape[:2]
    out = np.zeros((len(probs), H))
    for li, a in enumerate(probs):
        for b in range(B):
            for h in range(H):
                acc = 0.0
                for qi in range(gh * gw):
                    num = den = 0.0
                    for ki in range(gh * gw):
                        w = a[b, h, prefix + qi, prefix + ki]
                        dy = (qi // gw - ki // gw) * ph
                        dx = (qi % gw - ki % gw) * pw
                        num += w * math.hypot(dy, dx)
                        den += w
                    acc += num / den
                out[li, h] += acc / (gh * gw) / B
    return out


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_random_model_matches_loop_reference(classifier: str) -> None:
    model = random_model(classifier=classifier, image_size=(16, 12), patch_size=4, depth=2, num_heads=3, width=36)
    images = torch.randn(3, 3, 16, 12)
    got = mean_attention_distance(model, images, batch_size=2)  # two batches: checks the averaging too
    probs = attention_probs(model, images)
    prefix = 1 if classifier == "token" else 0
    expected = _loop_reference(probs, 4, 3, 4, 4, prefix)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    # the heads genuinely differ (a bug that mixed up heads would pass a constant)
    assert got.std() > 1e-3


def test_hybrid_uses_effective_patch() -> None:
    from vitlab import ResNetConfig, VisionTransformer, ViTConfig

    cfg = ViTConfig(image_size=32, patch_size=1, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3,
                    backbone=ResNetConfig(layers=(1, 1), width_factor=0.5))
    model = VisionTransformer(cfg).eval()
    a = torch.full((1, 1, 17, 17), 1.0 / 17)
    d = attention_distance([a], cfg.grid_size, cfg.effective_patch_hw, 1)
    assert cfg.effective_patch_hw == (8, 8)
    assert d.item() == pytest.approx(_brute_mean_pairwise(4, 4, 8, 8), rel=1e-6)
    assert mean_attention_distance(model, torch.randn(2, 3, 32, 32)).shape == (1, 2)
