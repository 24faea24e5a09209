"""Acceptance test of the model: the official JAX implementation's outputs, reproduced from its parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import FIXTURES, require
from tests.model.official_mapping import official_to_state_dict
from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer

TINY = dict(image_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128, num_classes=10, gelu="tanh")


def build(name: str, **overrides) -> tuple[VisionTransformer, dict]:
    params = dict(np.load(require(FIXTURES / f"{name}.params.npz")))
    cfg = ViTConfig(**{**TINY, **overrides})
    model = VisionTransformer(cfg).eval()
    model.load_state_dict(official_to_state_dict(params, cfg.depth), strict=True)
    return model, params


def fixture(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(require(FIXTURES / f"{name}.fixture.npz")))


CASES = {
    "vit_tiny_p4_32": {},
    "vit_tiny_p4_32_gap": {"classifier": "gap"},
    "vit_tiny_p4_32_repr": {"representation_size": 32},
    "hybrid_r2x2w05_vit_tiny_32": {"patch_size": 1, "backbone": ResNetConfig(layers=(2, 2), width_factor=0.5)},
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_pre_logits_and_encoded_match_official(name: str) -> None:
    model, _ = build(name, **CASES[name])
    fx = fixture(name)
    with torch.no_grad():
        x = torch.from_numpy(fx["inputs_nchw"])
        out = model.intermediates(x)
        logits = model(x)
    np.testing.assert_allclose(logits.numpy(), fx["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["logits"].numpy(), fx["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["pre_logits"].numpy(), fx["pre_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["encoded"].numpy(), fx["encoded"], atol=1e-4, rtol=0)
    gh, gw = model.config.grid_size
    emb = out["embedding"].reshape(x.shape[0], gh, gw, -1).numpy()  # B, gh, gw, D: the fixture's channels-last layout
    np.testing.assert_allclose(emb, fx["embedding_out"], atol=1e-4, rtol=0)
    for i in range(model.config.depth):
        if f"encoderblock_{i}_out" in fx:
            np.testing.assert_allclose(out[f"block_{i}"].numpy(), fx[f"encoderblock_{i}_out"], atol=1e-4, rtol=0)


def test_pre_logits_dense_before_tanh() -> None:
    model, _ = build("vit_tiny_p4_32_repr", representation_size=32)
    fx = fixture("vit_tiny_p4_32_repr")
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(fx["inputs_nchw"]))
        dense = model.pre_logits(model.pool(tokens))
    np.testing.assert_allclose(dense.numpy(), fx["pre_logits_dense_out"], atol=1e-5, rtol=0)


def test_hybrid_backbone_stages_match_official() -> None:
    name = "hybrid_r2x2w05_vit_tiny_32"
    model, _ = build(name, **CASES[name])
    fx = fixture(name)
    backbone = model.patch_embed.backbone
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    with torch.no_grad():
        x = torch.from_numpy(fx["inputs_nchw"])
        root = backbone.stem.conv(x)
        np.testing.assert_allclose(nhwc(root), fx["conv_root_out"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(nhwc(backbone.stem.norm(root)), fx["gn_root_out"], atol=1e-4, rtol=0)
        h = backbone.stem(x)
        for s, stage in enumerate(backbone.stages):
            h = stage(h)
            np.testing.assert_allclose(nhwc(h), fx[f"block{s + 1}_out"], atol=1e-4, rtol=0)


def test_resize_to_48_matches_official_resize() -> None:
    model, _ = build("vit_tiny_p4_32")
    fx = fixture("vit_tiny_p4_32_resize48")
    meta = json.loads(str(fx["meta_json"]))
    model.set_image_size(meta["image_size"])
    assert model.config.grid_size == (12, 12)
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), fx["posemb_resized"], atol=1e-6, rtol=0)
    with torch.no_grad():
        logits = model(torch.from_numpy(fx["inputs_nchw"]))
    np.testing.assert_allclose(logits.numpy(), fx["logits"], atol=1e-5, rtol=0)


def test_exact_gelu_is_measurably_different() -> None:
    """The fixtures can tell the GELU forms apart, so the parity above really pins the tanh form."""
    model, _ = build("vit_tiny_p4_32", gelu="exact")
    fx = fixture("vit_tiny_p4_32")
    with torch.no_grad():
        logits = model(torch.from_numpy(fx["inputs_nchw"])).numpy()
    assert np.abs(logits - fx["logits"]).max() > 2e-5
