"""vitlab's C++ LayerNorm with a bf16 result for the avx512-bf16 path (``src/vitlab/model/csrc/cpu_layer_norm.cpp``):
values against PyTorch's fp32 LayerNorm rounded to bf16 and against a hand computation, gradients against fp64
autograd, at widths with and without a vector tail; and that a block under CPU bf16 autocast takes it, computing
what the plain path computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.model.paths import NEEDS_AVX512_BF16, kernel_module
from tests.model.opnames import OpNames
from vitlab.model import fast
from vitlab.model.layers import Block

pytestmark = NEEDS_AVX512_BF16


@pytest.fixture(scope="module")
def kernel():
    return kernel_module("avx512-bf16")


def _case(shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, generator=g) * 3 + 1
    return x, torch.randn(D, generator=g), torch.randn(D, generator=g)


@pytest.mark.parametrize("shape", [(4, 64, 128), (2, 197, 384), (3, 5, 40), (1, 1, 7)])  # 40, 7: vector tails
def test_values_are_layer_norm_rounded_to_bf16(kernel, shape) -> None:
    x, w, b = _case(shape)
    y, mean, rstd = kernel.layer_norm_bf16_forward(x, w, b, 1e-6)
    exact = F.layer_norm(x.double(), (shape[-1],), w.double(), b.double(), 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # One rounding of the fp32 result: within half a bf16 ulp of the exact value, plus fp32 arithmetic.
    assert float(((y.double() - exact).abs() / exact.abs().clamp_min(1e-2)).max()) <= 2**-8 + 1e-5
    # Equal to PyTorch's fp32 LayerNorm cast to bf16 except where the fp32 results straddle a rounding boundary.
    torch_bf16 = F.layer_norm(x, (shape[-1],), w, b, 1e-6).bfloat16()
    assert float((y != torch_bf16).float().mean()) < 0.01
    torch.testing.assert_close(mean, x.mean(-1).flatten(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-6).rsqrt().flatten(), atol=1e-5, rtol=1e-5)


def test_hand_computed_row(kernel) -> None:
    """x = (1, 2, 3, 4): mean 2.5, biased variance 1.25, so xhat = (-1.5, -0.5, 0.5, 1.5) / sqrt(1.25)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y, mean, rstd = kernel.layer_norm_bf16_forward(x, torch.full((4,), 2.0), torch.full((4,), 1.0), 0.0)
    xhat = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 1.25**0.5
    torch.testing.assert_close(y.float(), (2 * xhat + 1).bfloat16().float().unsqueeze(0))
    assert float(mean) == 2.5 and abs(float(rstd) - 1.25**-0.5) < 1e-6


@pytest.mark.parametrize("shape", [(4, 64, 128), (3, 5, 40), (1, 1, 7)])
def test_gradients_match_fp64(kernel, shape) -> None:
    x, w, b = _case(shape, seed=1)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    _, mean, rstd = kernel.layer_norm_bf16_forward(x, w, b, 1e-6)
    dx, dw, db = kernel.layer_norm_bf16_backward(grad, x, w, mean, rstd)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    F.layer_norm(leaves[0], (shape[-1],), leaves[1], leaves[2], 1e-6).backward(grad.double())
    for ours, leaf in zip((dx, dw, db), leaves):
        assert ours.dtype == torch.float32 and ours.shape == leaf.shape
        assert float((ours.double() - leaf.grad).abs().max() / leaf.grad.abs().max()) < 1e-5


def test_block_uses_it_under_autocast_and_matches_the_plain_path(kernel) -> None:
    torch.manual_seed(0)
    block = Block(32, 2, 64).train()
    x = torch.randn(3, 9, 32, requires_grad=True)

    def run() -> tuple[torch.Tensor, list[torch.Tensor], set]:
        block.zero_grad()
        x.grad = None
        with OpNames() as ops, torch.autocast("cpu", torch.bfloat16):
            y = block(x)
        y.float().square().sum().backward()
        return y.float(), [x.grad.clone()] + [p.grad.clone() for p in block.parameters()], ops.names

    with fast.use("avx512-bf16"):
        y, grads, names = run()
    with fast.use("plain"):
        y_plain, grads_plain, names_plain = run()
    assert "aten.native_layer_norm" not in names and "aten.native_layer_norm_backward" not in names
    assert "aten.native_layer_norm" in names_plain
    torch.testing.assert_close(y, y_plain, atol=2e-2, rtol=2e-2)
    for g, g_plain in zip(grads, grads_plain):
        assert float((g - g_plain).norm() / g_plain.norm()) < 2e-2


def test_bad_input_names_what_was_expected(kernel) -> None:
    x, w, b = _case((2, 16))
    with pytest.raises(RuntimeError, match="x must be a contiguous Float CPU tensor"):
        kernel.layer_norm_bf16_forward(x.bfloat16(), w, b, 1e-6)
    with pytest.raises(RuntimeError, match="weight and bias must have 16 values"):
        kernel.layer_norm_bf16_forward(x, w[:8], b, 1e-6)
    _, mean, rstd = kernel.layer_norm_bf16_forward(x, w, b, 1e-6)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        kernel.layer_norm_bf16_backward(torch.zeros(2, 8).bfloat16(), x, w, mean, rstd)
