"""vitlab's C++ tanh GELU for the avx512-bf16 path (``src/vitlab/model/csrc/cpu_gelu.cpp``): values and gradients
against an fp64 computation of the formula and against PyTorch's own tanh GELU, at sizes that exercise the vector
tail and the parallel split; and that the MLP and the model take it, computing what the plain path computes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.model.paths import NEEDS_AVX512_BF16, kernel_module
from tests.model.opnames import OpNames, autograd_nodes
from vitlab.model import ViTConfig, VisionTransformer, fast
from vitlab.model.layers import Mlp

pytestmark = NEEDS_AVX512_BF16


@pytest.fixture(scope="module")
def kernel():
    return kernel_module("avx512-bf16")


def _inputs(n: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4
    x[:6] = torch.tensor([0.0, -30.0, 30.0, -200.0, 1e-4, -1e-4])[: min(6, n)]  # saturated tails, the origin
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 37, 16 * 1024 * 3 + 5])  # a partial vector; several parallel chunks
def test_values_and_gradient_match_fp64(kernel, dtype, n) -> None:
    x = _inputs(n, dtype)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    xd = x.double().requires_grad_()
    exact = F.gelu(xd, approximate="tanh")
    exact.backward(grad.double())
    ours, ours_grad = kernel.gelu_tanh_forward(x), kernel.gelu_tanh_backward(grad, x)
    theirs = F.gelu(x, approximate="tanh")
    theirs_grad = torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    assert ours.dtype == dtype and ours_grad.dtype == dtype
    # Both compute in fp32 and round once: no worse than PyTorch's own kernel, up to a few ulps of fp32 arithmetic
    # at the scale of the values (the gradient crosses zero near x = -0.75, where no fp32 formula is exact
    # relative to the value); in bf16 every value within one rounding of the exact one.
    eps32 = torch.finfo(torch.float32).eps
    for a, b, ref in ((ours, theirs, exact.detach()), (ours_grad, theirs_grad, xd.grad)):
        err, err_torch = (a.double() - ref).abs(), (b.double() - ref).abs()
        tolerance = err_torch.max() + ref.abs().max() * 16 * eps32
        assert float(err.max()) <= float(tolerance), (float(err.max()), float(err_torch.max()))
        if dtype == torch.bfloat16:
            assert float((err / ref.abs().clamp_min(1e-3)).max()) < 2 * torch.finfo(dtype).eps


def test_known_values(kernel) -> None:
    """GELU_tanh(1) = 0.5 (1 + tanh(sqrt(2/pi) 1.044715)) = 0.841192; it tends to x for large x and to 0 below."""
    x = torch.tensor([1.0, 0.0, 10.0, -10.0, -1.0])
    y = kernel.gelu_tanh_forward(x)
    expected_1 = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))
    assert abs(expected_1 - 0.841192) < 1e-6
    torch.testing.assert_close(y, torch.tensor([expected_1, 0.0, 10.0, 0.0, expected_1 - 1.0]), atol=1e-6, rtol=1e-6)
    # The slope at 0 is 1/2 (x sigmoid(u) with u(0) = 0).
    torch.testing.assert_close(kernel.gelu_tanh_backward(torch.ones(1), torch.zeros(1)), torch.tensor([0.5]))


def test_mlp_uses_it_and_matches_the_plain_path(kernel) -> None:
    torch.manual_seed(0)
    mlp = Mlp(32, 64, gelu="tanh")
    x = torch.randn(4, 9, 32)

    def run() -> tuple[torch.Tensor, list[torch.Tensor], set]:
        mlp.zero_grad()
        with OpNames() as ops, torch.autocast("cpu", torch.bfloat16):
            y = mlp(x)
        y.float().square().sum().backward()
        return y.float(), [p.grad.clone() for p in mlp.parameters()], ops.names

    with fast.use("avx512-bf16"):
        y, grads, names = run()
    with fast.use("plain"):
        y_plain, grads_plain, names_plain = run()
    assert "aten.gelu" not in names and "aten.gelu_backward" not in names
    assert "aten.gelu" in names_plain
    torch.testing.assert_close(y, y_plain, atol=1e-2, rtol=1e-2)
    for g, g_plain in zip(grads, grads_plain):
        torch.testing.assert_close(g, g_plain, atol=5e-2, rtol=2e-2)


def test_fp16_and_erf_keep_pytorchs_gelu(kernel) -> None:
    """fp16 (which the kernel does not take) and the erf GELU (whose PyTorch kernel is already fast) run
    ``aten.gelu``."""
    for h, approximate in ((torch.randn(2, 8, dtype=torch.float16), "tanh"), (torch.randn(2, 8), "none")):
        with fast.use("avx512-bf16"), OpNames() as ops:
            y = fast.gelu(h, nn.GELU(approximate=approximate))
        assert "aten.gelu" in ops.names
        torch.testing.assert_close(y, F.gelu(h, approximate=approximate))


def test_fp32_model_training_matches_the_plain_path(kernel) -> None:
    """In fp32 the avx512-bf16 path keeps SDPA and LayerNorm and takes only the kernel's fp32 GELU: gradients equal
    the plain path's to fp32 rounding."""
    config = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)
    model = VisionTransformer(config).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 3, 16, 16)
    grads, nodes = {}, {}
    for path in ("avx512-bf16", "plain"):
        model.zero_grad()
        with fast.use(path):
            out = model(x)
            out.logsumexp(-1).sum().backward()
        nodes[path] = autograd_nodes(out)
        grads[path] = [p.grad.clone() for p in model.parameters()]
    assert "_KernelGeluBackward" in nodes["avx512-bf16"] and "GeluBackward0" not in nodes["avx512-bf16"]
    assert "GeluBackward0" in nodes["plain"]
    for g, g_plain in zip(grads["avx512-bf16"], grads["plain"]):
        torch.testing.assert_close(g, g_plain, atol=1e-5, rtol=1e-5)


def test_bad_input_names_what_was_expected(kernel) -> None:
    with pytest.raises(RuntimeError, match="x must be a bf16 or fp32 CPU tensor"):
        kernel.gelu_tanh_forward(torch.zeros(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        kernel.gelu_tanh_forward(torch.zeros(4, 4).t())
    with pytest.raises(RuntimeError, match="does not match x"):
        kernel.gelu_tanh_backward(torch.zeros(3), torch.zeros(4))
