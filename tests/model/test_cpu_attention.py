"""vitlab's C++ bf16 attention kernel (``src/vitlab/model/csrc/cpu_attention.cpp``) on the avx512-bf16 path: its
forward and gradients against an fp64 computation of softmax attention (and against PyTorch's own fused CPU
kernel's error), on the strided q, k, v views the model makes, at sizes that exercise the vector tails; and that
the model takes it, computing what the plain path computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.model.paths import NEEDS_AVX512_BF16, kernel_module
from tests.model.opnames import OpNames, autograd_nodes
from vitlab.model import ViTConfig, VisionTransformer, fast

REPO = Path(__file__).resolve().parents[2]
pytestmark = NEEDS_AVX512_BF16


@pytest.fixture(scope="module")
def kernel():
    return kernel_module("avx512-bf16")


# (batch, tokens, heads, head dim): the CIFAR model at 24 and 32 px, ViT-S/16 at 224, and odd sizes (token counts
# off the 16-wide vectors and the 4-row tiles, odd counts that leave the last pair half empty, a single token).
SHAPES = [(3, 37, 4, 32), (2, 65, 4, 32), (2, 197, 6, 64), (2, 5, 3, 16), (1, 1, 1, 16), (2, 50, 2, 48)]


def _views(batch: int, tokens: int, heads: int, hd: int, dtype=torch.bfloat16, seed: int = 0):
    base = torch.randn(batch, tokens, 3, heads, hd, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return base, fast.split_heads(base)  # q, k, v: (B, H, N, hd) strided views, as Attention makes them


def rel_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float((a.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_error_is_that_of_the_fused_kernel(kernel, shape) -> None:
    _, (q, k, v) = _views(*shape)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = kernel.attention_forward(q, k, v, shape[3] ** -0.5)
    fused = F.scaled_dot_product_attention(q, k, v)
    torch_ops = fast.sliced_attention(q, k, v)  # the path's torch-op fallback: the same arithmetic
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    # The output is a (B, H, N, hd) view of a dense (B, N, H, hd) tensor: heads merge without a copy.
    assert ours.transpose(1, 2).is_contiguous()
    err, err_fused = rel_error(ours, exact), rel_error(fused, exact)
    assert err < 2.5e-3  # bf16's own rounding of the output is ~1e-3 (RMS)
    if q.numel() >= 10_000:  # on a few hundred values either rounding may be the luckier one
        assert err <= 1.2 * err_fused, (err, err_fused)
    torch.testing.assert_close(ours, torch_ops, atol=2e-2, rtol=2e-2)


def test_forward_hand_computed(kernel) -> None:
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


def _grads(fn, base: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """The gradient of qkv (B, N, 3, H, hd) through ``fn(qkv)``, and the autograd nodes it went through."""
    qkv = base.clone().requires_grad_()
    out = fn(qkv)
    out.backward(grad)
    return qkv.grad, autograd_nodes(out)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*fast.split_heads(qkv))


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_error_is_that_of_the_fused_kernel(kernel, shape) -> None:
    batch, tokens, heads, hd = shape
    base, _ = _views(*shape)
    grad = torch.randn(batch, heads, tokens, hd, generator=torch.Generator().manual_seed(1)).bfloat16()
    exact, _ = _grads(_sdpa, base.double(), grad.double())
    with fast.use("avx512-bf16"):
        ours, nodes = _grads(fast.attention, base, grad)
    fused, _ = _grads(_sdpa, base, grad)
    assert "SlicedAttentionBackward" in nodes  # the model's training attention, whose backward is the kernel's
    assert ours.dtype == torch.bfloat16
    assert rel_error(ours, exact) <= 1.2 * rel_error(fused, exact), (rel_error(ours, exact), rel_error(fused, exact))


def test_backward_called_directly_matches_fp64(kernel) -> None:
    _, (q, k, v) = _views(2, 21, 3, 16)
    dout = torch.randn(2, 3, 21, 16).bfloat16()
    dqkv = kernel.attention_backward(q, k, v, dout, 0.25)
    # One dense tensor in the qkv projection's layout (B, N, 3, H, hd), dq, dk, dv side by side.
    assert dqkv.shape == (2, 21, 3, 3, 16) and dqkv.is_contiguous()
    dq, dk, dv = fast.split_heads(dqkv)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qd, kd, vd, scale=0.25).backward(dout.double())
    for ours, exact in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert rel_error(ours, exact) < 1e-2


# GAP: every block attends for every token (with the class token, the last block computes one row through SDPA).
CONFIG = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5,
                   classifier="gap")


def bf16_model() -> VisionTransformer:
    model = VisionTransformer(CONFIG).bfloat16()
    with torch.no_grad():  # a non-zero head, so that gradients reach the attention
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def run_bf16(model: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], set[str]]:
    """bf16 inference logits, training gradients of every parameter, and the ops both ran."""
    model.zero_grad()
    with OpNames() as ops:
        with torch.no_grad():
            logits = model.eval()(x)
        model.train()(x).float().square().sum().backward()
    return logits.float(), [p.grad.float().clone() for p in model.parameters()], ops.names


def test_the_model_runs_it_and_matches_the_plain_path(kernel) -> None:
    """bf16 inference and training of a model go through the kernel (neither a batched matmul nor SDPA for
    attention); the plain path (SDPA) computes the same logits and gradients within bf16's precision."""
    model, x = bf16_model(), torch.randn(3, 3, 16, 16).bfloat16()
    with fast.use("avx512-bf16"):
        logits, grads, names = run_bf16(model, x)
    with fast.use("plain"):
        logits_plain, grads_plain, names_plain = run_bf16(model, x)
    assert "aten.bmm" not in names and "aten._scaled_dot_product_flash_attention_for_cpu" not in names
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in names_plain
    torch.testing.assert_close(logits, logits_plain, atol=5e-2, rtol=5e-2)
    for g, g_plain in zip(grads, grads_plain):
        assert rel_error(g, g_plain.double()) < 5e-2


@pytest.mark.parametrize("hd,taken", [(16, True), (8, False)])
def test_the_kernel_is_taken_only_for_head_dims_it_handles(kernel, hd, taken) -> None:
    """The kernel's matmuls take head dims in multiples of 16; below, the path computes the same attention with
    batched matmuls (torch ops)."""
    base, (q, k, v) = _views(2, 9, 2, hd)
    with fast.use("avx512-bf16"), torch.no_grad(), OpNames() as ops:
        out = fast.attention(base)
    assert ("aten.bmm" not in ops.names) == taken
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in ops.names
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    fused = F.scaled_dot_product_attention(q, k, v)
    # On 288 values either bf16 rounding may be the luckier one: within SDPA's error, or a bf16 step (2^-8).
    assert rel_error(out, exact) <= max(1.2 * rel_error(fused, exact), 2**-8)


def test_bad_input_names_what_was_expected(kernel) -> None:
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


def test_switched_off_by_environment() -> None:
    """With ``VITLAB_CPU_KERNELS=0`` (a fresh process: the kernels load once) neither build loads, and the
    avx512-bf16 path trains bf16 attention with batched matmuls (torch ops) to the plain path's result."""
    script = """
import json, torch
from tests.model.test_cpu_attention import bf16_model, run_bf16, rel_error
from vitlab.model import cpu_kernels, fast
torch.set_num_threads(1)
model, x = bf16_model(), torch.randn(3, 3, 16, 16).bfloat16()
with fast.use("avx512-bf16"):
    logits, grads, names = run_bf16(model, x)
with fast.use("plain"):
    logits_plain, grads_plain, _ = run_bf16(model, x)
print(json.dumps({"kernels": cpu_kernels.kernels() is not None, "fp32_kernels": cpu_kernels.fp32_kernels() is not None,
                  "bmm": "aten.bmm" in names, "logits": float((logits - logits_plain).abs().max()),
                  "scale": float(logits_plain.abs().max()),
                  "grads": max(rel_error(g, p.double()) for g, p in zip(grads, grads_plain))}))
"""
    env = {**os.environ, "VITLAB_CPU_KERNELS": "0"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernels"] is False and result["fp32_kernels"] is False
    assert result["bmm"] is True
    assert result["logits"] <= 5e-2 * max(1.0, result["scale"]) and result["grads"] < 5e-2
