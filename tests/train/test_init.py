"""Mimetic attention initialisation: the products it promises, checked by hand."""

from __future__ import annotations

import torch

import vitlab
from vitlab.train.init import mimetic_attention_init_


def _model(heads: int, width: int = 64):
    return vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=width, depth=2,
                               num_heads=heads, mlp_dim=2 * width)


def test_one_head_products_are_identity_plus_noise():
    # With a single head the factorisation is exact: W_q^T W_k = 0.7 Z + 0.7 I and W_v^T W_o^T = 0.4 Z - 0.4 I,
    # Z uniform with variance 1/width: diagonal means 0.7 / -0.4, off-diagonal spread alpha / sqrt(width).
    width = 64
    model = _model(1, width)
    mimetic_attention_init_(model, generator=torch.Generator().manual_seed(0))
    for block in model.blocks:
        w = block.attn.qkv.weight.double()
        qk = w[:width].T @ w[width:2 * width]
        vo = w[2 * width:].T @ block.attn.proj.weight.double().T
        for product, beta, alpha in ((qk, 0.7, 0.7), (vo, -0.4, 0.4)):
            diag = product.diagonal()
            off = product - torch.diag(diag)
            assert abs(diag.mean().item() - beta) < 0.05
            expected_std = alpha / width**0.5
            assert abs(off[~torch.eye(width, dtype=torch.bool)].std().item() - expected_std) < 0.15 * expected_std


def test_each_head_gets_the_best_low_rank_part():
    # Per head, W_q^T W_k has rank head_dim and its singular values are the largest of 0.7 Z + 0.7 I.
    width, heads = 64, 4
    model = _model(heads, width)
    mimetic_attention_init_(model, generator=torch.Generator().manual_seed(1))
    w = model.blocks[0].attn.qkv.weight.double()
    hd = width // heads
    for h in range(heads):
        qk = w[h * hd:(h + 1) * hd].T @ w[width + h * hd:width + (h + 1) * hd]
        s = torch.linalg.svdvals(qk)
        assert (s[hd:] < 1e-6).all() and (s[:hd] > 0.5).all()
        # The positive identity part dominates: the trace is about 0.7 * head_dim-worth of eigenvalues.
        assert qk.trace().item() > 0.5 * hd


def test_training_from_scratch_uses_it_from_the_config():
    from tests.train.tiny import tiny_overrides
    from vitlab.train import load_config
    from vitlab.train.engine import build_model

    cfg = load_config(None, tiny_overrides(attention_init="mimetic"))
    torch.manual_seed(0)
    w = build_model(cfg, 3).blocks[0].attn.qkv.weight
    width = w.shape[1]
    qk = w[:width // 2].T @ w[width:width + width // 2]  # head 0 of 2
    assert qk.trace().item() > 0.25 * width  # near +identity; a Xavier start has trace about 0
    torch.manual_seed(0)
    plain = build_model(load_config(None, tiny_overrides()), 3).blocks[0].attn.qkv.weight
    assert abs((plain[:width // 2].T @ plain[width:width + width // 2]).trace().item()) < 0.25 * width
