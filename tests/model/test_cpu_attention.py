"""vitlab's C++ bf16 attention kernel (``src/vitlab/model/csrc/cpu_attention.cpp``): its forward and gradients
against an fp64 computation of softmax attention (and against PyTorch's own fused CPU kernel's error), on the
strided q, k, v views the model makes, at sizes that exercise the vector tails; and that the model uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.model import ViTConfig, VisionTransformer, cpu_kernels, layers

kernel = cpu_kernels.kernels()
pytestmark = pytest.mark.skipif(kernel is None, reason="the C++ kernel cannot be built here")

# (batch, tokens, heads, head dim): the CIFAR model at 24 and 32 px, ViT-S/16 at 224, and odd sizes (token counts
# off the 16-wide vectors and the 4-row tiles, odd counts that leave the last pair half empty, a single token).
SHAPES = [(3, 37, 4, 32), (2, 65, 4, 32), (2, 197, 6, 64), (2, 5, 3, 16), (1, 1, 1, 16), (2, 50, 2, 48)]


def _views(batch: int, tokens: int, heads: int, hd: int, dtype=torch.bfloat16, seed: int = 0):
    base = torch.randn(batch, tokens, 3, heads, hd, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return base, base.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: (B, H, N, hd) strided views, as Attention makes


def _rel(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float((a.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_error_is_that_of_the_fused_kernel(shape) -> None:
    _, (q, k, v) = _views(*shape)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = kernel.attention_forward(q, k, v, shape[3] ** -0.5)
    fused = F.scaled_dot_product_attention(q, k, v)
    torch_ops = layers._sliced_attention(q, k, v)  # vitlab's torch-op path: the same arithmetic
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    # The output is a (B, H, N, hd) view of a dense (B, N, H, hd) tensor: heads merge without a copy.
    assert ours.transpose(1, 2).is_contiguous()
    err, err_fused = _rel(ours, exact), _rel(fused, exact)
    assert err < 2.5e-3  # bf16's own rounding of the output is ~1e-3 (RMS)
    if q.numel() >= 10_000:  # on a few hundred values either rounding may be the luckier one
        assert err <= 1.2 * err_fused, (err, err_fused)
    torch.testing.assert_close(ours, torch_ops, atol=2e-2, rtol=2e-2)


def test_forward_hand_computed() -> None:
    """Two tokens, one head: the attention weights are a two-way softmax that can be written down (head dimension
    16, of which the first two channels are non-zero)."""
    q, k, v = (torch.zeros(1, 1, 2, 16) for _ in range(3))  # B=1, H=1, N=2, hd=16
    q[0, 0, :, :2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k[0, 0, :, :2] = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    v[0, 0, :, :2] = torch.tensor([[1.0, -1.0], [3.0, 5.0]])
    out = kernel.attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.5).float()[0, 0, :, :2]
    # token 0: logits 0.5 * (2, 0) -> weights (e/(e+1), 1/(e+1)); token 1: 0.5 * (0, 2) -> (1/(1+e), e/(1+e))
    e = torch.e
    w0 = torch.tensor([e / (e + 1), 1 / (e + 1)])
    expected = torch.stack([w0 @ torch.tensor([[1.0, -1.0], [3.0, 5.0]]),
                            w0.flip(0) @ torch.tensor([[1.0, -1.0], [3.0, 5.0]])])
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)


def _grads(fn, base: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of qkv (B, N, 3, H, hd) through ``fn(qkv)``."""
    qkv = base.clone().requires_grad_()
    fn(qkv).backward(grad)
    return qkv.grad


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*layers._split_heads(qkv))


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_error_is_that_of_the_fused_kernel(shape) -> None:
    batch, tokens, heads, hd = shape
    base, _ = _views(*shape)
    grad = torch.randn(batch, heads, tokens, hd, generator=torch.Generator().manual_seed(1)).bfloat16()
    exact = _grads(_sdpa, base.double(), grad.double())
    ours = _grads(layers._ReducedPrecisionAttention.apply, base, grad)
    fused = _grads(_sdpa, base, grad)
    assert ours.dtype == torch.bfloat16
    assert _rel(ours, exact) <= 1.2 * _rel(fused, exact), (_rel(ours, exact), _rel(fused, exact))


def test_backward_called_directly_matches_fp64() -> None:
    _, (q, k, v) = _views(2, 21, 3, 16)
    dout = torch.randn(2, 3, 21, 16).bfloat16()
    dqkv = kernel.attention_backward(q, k, v, dout, 0.25)
    # One dense tensor in the qkv projection's layout (B, N, 3, H, hd), dq, dk, dv side by side.
    assert dqkv.shape == (2, 21, 3, 3, 16) and dqkv.is_contiguous()
    dq, dk, dv = layers._split_heads(dqkv)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qd, kd, vd, scale=0.25).backward(dout.double())
    for ours, exact in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert _rel(ours, exact) < 1e-2


def test_the_model_runs_it_and_falls_back_without_it(monkeypatch) -> None:
    """bf16 inference and training of a model go through the kernel (no batched matmul for attention); with the
    kernel switched off the model computes the same logits and gradients through torch ops."""
    from tests.bench.test_fused import OpNames

    config = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)
    model = VisionTransformer(config).bfloat16()
    with torch.no_grad():  # a non-zero head, so that gradients reach the attention
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 3, 16, 16).bfloat16()

    def run() -> tuple[torch.Tensor, list[torch.Tensor], set]:
        model.zero_grad()
        with OpNames() as ops:
            with torch.no_grad():
                logits = model.eval()(x)
            model.train()(x).float().square().sum().backward()
        return logits.float(), [p.grad.float().clone() for p in model.parameters()], ops.names

    logits, grads, names = run()
    assert "aten.bmm" not in names and "aten._scaled_dot_product_flash_attention_for_cpu" not in names
    monkeypatch.setattr(cpu_kernels, "_state", {"module": None})
    logits_torch, grads_torch, names_torch = run()
    assert "aten.bmm" in names_torch
    torch.testing.assert_close(logits, logits_torch, atol=5e-2, rtol=5e-2)
    for g, g_torch in zip(grads, grads_torch):
        assert _rel(g, g_torch.double()) < 5e-2


def test_bad_input_names_what_was_expected() -> None:
    _, (q, k, v) = _views(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel.attention_forward(q.float(), k, v, 1.0)
    with pytest.raises(RuntimeError, match="k has shape"):
        kernel.attention_forward(q, k[:, :, :3], v, 1.0)
    strided = torch.randn(1, 2, 16, 4).bfloat16().transpose(-1, -2)  # (1, 2, 4, 16) with a strided last dimension
    with pytest.raises(RuntimeError, match="last dimension must be dense"):
        kernel.attention_forward(q, strided, v, 1.0)
    _, (q8, k8, v8) = _views(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="multiple of 16, got 8"):
        kernel.attention_forward(q8, k8, v8, 1.0)
    assert layers._cpu_kernel_for(q8) is None  # the model takes its torch-op path there


def test_switched_off_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("VITLAB_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.kernels() is None
