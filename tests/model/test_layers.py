"""Each layer against a hand computation on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlab.model.config import ResNetConfig
from vitlab.model.layers import Attention, Block, DropPath, Mlp, PatchEmbed
from vitlab.model.resnet import StdConv2dSame, pad_same


def test_patch_embed_is_a_linear_map_of_each_flattened_patch() -> None:
    pe = PatchEmbed((2, 2), 3, 5)
    x = torch.randn(1, 3, 4, 6)
    out = pe(x)  # 1, 6, 5
    w = pe.proj.weight.reshape(5, -1)  # D, C*ph*pw
    expected = []
    for r in range(2):
        for c in range(3):
            patch = x[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1)  # C, ph, pw flattened
            expected.append(w @ patch + pe.proj.bias)
    torch.testing.assert_close(out[0], torch.stack(expected), atol=1e-6, rtol=0)


def manual_attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, D = x.shape
    H, hd = attn.num_heads, D // attn.num_heads
    Wq, Wk, Wv = attn.qkv.weight.split(D)
    bq, bk, bv = attn.qkv.bias.split(D)
    outs, probs = [], []
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        q = x @ Wq[sl].T + bq[sl]
        k = x @ Wk[sl].T + bk[sl]
        v = x @ Wv[sl].T + bv[sl]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        probs.append(a)
        outs.append(a @ v)
    o = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    return o, torch.stack(probs, dim=1)


def test_attention_fast_and_explicit_paths_match_hand_computation() -> None:
    attn = Attention(8, 2).eval()
    x = torch.randn(3, 5, 8)
    ref_out, ref_probs = manual_attention(attn, x)
    torch.testing.assert_close(attn(x), ref_out, atol=1e-5, rtol=0)
    out, probs = attn.forward_with_probs(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 5), atol=1e-6, rtol=0)


def test_mlp_gelu_forms() -> None:
    x = torch.randn(4, 6)
    for form in ("tanh", "exact"):
        mlp = Mlp(6, 10, gelu=form)
        h = x @ mlp.fc1.weight.T + mlp.fc1.bias
        if form == "tanh":
            g = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        else:
            g = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        torch.testing.assert_close(mlp(x), g @ mlp.fc2.weight.T + mlp.fc2.bias, atol=1e-6, rtol=0)


def test_block_is_pre_norm_residual() -> None:
    block = Block(8, 2, 16, norm_eps=1e-6).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 4, 8)

    def ln(t, m):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * m.weight + m.bias

    h = x + manual_attention(block.attn, ln(x, block.norm1))[0]
    expected = h + block.mlp(ln(h, block.norm2))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(block.forward_with_probs(x)[0], expected, atol=1e-5, rtol=0)


def test_drop_path_drops_whole_samples_and_rescales() -> None:
    torch.manual_seed(1)
    dp = DropPath(0.5).train()
    x = torch.ones(1000, 3, 2)
    y = dp(x)
    per_sample = y.reshape(1000, -1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert abs(y.mean().item() - 1.0) < 0.1
    assert torch.equal(dp.eval()(x), x)


@pytest.mark.parametrize("size,kernel,stride,expected", [(32, 7, 2, (2, 3)), (16, 3, 2, (0, 1)), (8, 3, 1, (1, 1)), (8, 1, 2, (0, 0))])
def test_tf_same_padding_puts_odd_pixel_bottom_right(size, kernel, stride, expected) -> None:
    x = torch.zeros(1, 1, size, size)
    y = pad_same(x, kernel, stride)
    assert y.shape[-1] == size + sum(expected)
    y = pad_same(torch.ones(1, 1, size, size), kernel, stride, value=0.0)
    before, after = expected
    assert y[0, 0, before, before] == 1.0
    if after:
        assert y[0, 0, -1, -1] == 0.0 and y[0, 0, -after - 1, -after - 1] == 1.0


def test_weight_standardisation_both_forms() -> None:
    conv = StdConv2dSame(2, 3, 3, eps=1e-5)
    w = conv.weight.detach().numpy().astype(np.float64)
    mean = w.mean(axis=(1, 2, 3), keepdims=True)
    std = w.std(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(conv.standardized_weight().detach().numpy(), (w - mean) / (std + 1e-5), atol=1e-5)
    conv.eps_in_sqrt, conv.eps = True, 1e-8
    np.testing.assert_allclose(conv.standardized_weight().detach().numpy(), (w - mean) / np.sqrt(std**2 + 1e-8), atol=1e-5)
    x = torch.randn(1, 2, 5, 5)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.standardized_weight())
    torch.testing.assert_close(conv(x), expected)


def test_resnet_config_geometry() -> None:
    cfg = ResNetConfig(layers=(3, 4, 9))
    assert cfg.out_channels == 1024 and cfg.stride == 16
    assert ResNetConfig(layers=(3, 4, 6, 3)).stride == 32
    with pytest.raises(ValueError, match="layers"):
        ResNetConfig(layers=())
