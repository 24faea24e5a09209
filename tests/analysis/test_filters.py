"""PCA of the patch-embedding filters (Fig. 7 left) against an eigendecomposition of the filters' covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.analysis.reference import random_model
from vitlab.analysis import embedding_filters


def test_components_match_covariance_eigenvectors() -> None:
    model = random_model(width=48, patch_size=4)
    pca = embedding_filters(model, k=10)
    assert pca.components.shape == (10, 3, 4, 4) and pca.explained_variance.shape == (10,)
    w = model.patch_embed.proj.weight.detach().double().numpy().reshape(48, -1)
    cov = np.cov(w, rowvar=False)  # (48 filters as samples) -> 48 x 48 covariance
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    np.testing.assert_allclose(pca.explained_variance.numpy(), vals[:10] / vals.sum(), rtol=1e-5, atol=1e-7)
    got = pca.components.reshape(10, -1).double().numpy()
    for i in range(10):
        # eigenvectors are defined up to sign
        assert abs(got[i] @ vecs[:, i]) == pytest.approx(1.0, abs=1e-4)
        assert got[i][np.argmax(np.abs(got[i]))] > 0  # the documented sign convention
    assert float(pca.explained_variance.sum()) < 1.0


def test_k_is_clipped_and_validated() -> None:
    model = random_model(width=8, patch_size=4)  # 8 filters: at most 8 components
    assert embedding_filters(model, k=28).components.shape[0] == 8
    with pytest.raises(ValueError, match="k must be positive"):
        embedding_filters(model, k=0)


def test_hybrid_is_refused() -> None:
    from vitlab import ResNetConfig, VisionTransformer, ViTConfig

    cfg = ViTConfig(image_size=32, patch_size=1, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3,
                    backbone=ResNetConfig(layers=(1, 1), width_factor=0.5))
    with pytest.raises(ValueError, match="hybrid"):
        embedding_filters(VisionTransformer(cfg))
