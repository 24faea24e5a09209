"""The avx2 path of ``vitlab.model.fast`` (fp32, for x86 CPUs without native bf16): its C++ kernels
(``src/vitlab/model/csrc/cpu_fp32.cpp``) against float64 computations of the same functions, at sizes off the
8-wide vectors and the register tiles, and the whole model under ``fast.use("avx2")`` against ``fast.use("plain")``
(inference logits and training gradients), with evidence that the avx2 code really ran."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.model.paths import NEEDS_AVX2, kernel_module
from tests.model.opnames import OpNames, autograd_nodes
from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer, fast
from vitlab.model.layers import Block

REPO = Path(__file__).resolve().parents[2]
pytestmark = NEEDS_AVX2


@pytest.fixture(scope="module")
def kernel():
    return kernel_module("avx2")


def _exact_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v in float64, written out (no SDPA), as (B, H, N, hd)."""
    q, k, v = fast.split_heads(qkv.double())  # B, H, N, hd
    return torch.softmax(scale * q @ k.transpose(-2, -1), dim=-1) @ v


def _qkv(batch: int, tokens: int, heads: int, hd: int, layout: str, seed: int = 0) -> torch.Tensor:
    """(B, N, 3, H, hd) fp32: ``dense`` as the qkv projection makes it; ``strided``, a view into a wider tensor (the
    head stride is not hd, the sample and token strides not the dense ones), its last dimension still dense."""
    g = torch.Generator().manual_seed(seed)
    if layout == "dense":
        return torch.randn(batch, tokens, 3, heads, hd, generator=g)
    return torch.randn(batch, tokens + 1, 3, heads, hd + 8, generator=g)[:, 1:, :, :, 4:4 + hd]


# (batch, tokens, heads, head dim): token counts off the 8-wide vectors (13, 65) and the 4-row tiles, odd B*H,
# a single token, the CIFAR model's 65 tokens at head dim 32, ViT-S's head dim 64, and 16 (two vectors).
SHAPES = [(1, 13, 3, 8), (3, 65, 1, 32), (3, 13, 3, 64), (1, 1, 1, 8), (5, 7, 1, 16), (2, 65, 3, 32)]


@pytest.mark.parametrize("layout", ["dense", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_forward_matches_fp64(kernel, shape, layout) -> None:
    batch, tokens, heads, hd = shape
    qkv = _qkv(*shape, layout)
    scale = hd**-0.5 if layout == "dense" else 0.3  # the scale is an argument, not assumed
    out = kernel.attention_forward(qkv, scale)
    # The output comes in the (B, N, H, hd) layout the output projection reads.
    assert out.shape == (batch, tokens, heads, hd) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.transpose(1, 2).double(), _exact_attention(qkv, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_backward_matches_fp64(kernel, shape, grad_layout) -> None:
    batch, tokens, heads, hd = shape
    qkv = _qkv(*shape, "strided" if grad_layout == "transposed" else "dense", seed=1)
    g = torch.Generator().manual_seed(2)
    if grad_layout == "contiguous":
        dout = torch.randn(batch, heads, tokens, hd, generator=g)
    else:  # what autograd hands back through the model's (B, N, H, hd) -> (B, H, N, hd) view
        dout = torch.randn(batch, tokens, heads, hd, generator=g).transpose(1, 2)
    scale = hd**-0.5
    dqkv = kernel.attention_backward(qkv, dout, scale)
    # One dense gradient in qkv's own (B, N, 3, H, hd) layout, dq, dk, dv side by side.
    assert dqkv.shape == (batch, tokens, 3, heads, hd) and dqkv.is_contiguous()
    leaf = qkv.double().requires_grad_()
    _exact_attention(leaf, scale).backward(dout.double())
    torch.testing.assert_close(dqkv.double(), leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_saved_probs_match_fp64(kernel, shape) -> None:
    """The training forward also returns the probabilities (zero padding columns up to whole vectors) and the
    backward reads them instead of recomputing: both against the fp64 reference, and the backward equal to the
    recomputing one."""
    batch, tokens, heads, hd = shape
    qkv = _qkv(*shape, "strided", seed=3)
    scale = hd**-0.5
    out, probs = kernel.attention_forward_probs(qkv, scale)
    padded = (tokens + 7) // 8 * 8
    assert probs.shape == (batch, heads, tokens, padded) and probs.is_contiguous()
    q, k, _ = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
    exact_probs = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
    torch.testing.assert_close(probs[..., :tokens].double(), exact_probs, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(probs[..., tokens:]) == 0
    torch.testing.assert_close(out, kernel.attention_forward(qkv, scale), atol=0, rtol=0)
    dout = torch.randn(batch, tokens, heads, hd, generator=torch.Generator().manual_seed(4)).transpose(1, 2)
    dqkv = kernel.attention_backward(qkv, dout, scale, probs)
    leaf = qkv.double().requires_grad_()
    _exact_attention(leaf, scale).backward(dout.double())
    torch.testing.assert_close(dqkv.double(), leaf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv, kernel.attention_backward(qkv, dout, scale), atol=1e-6, rtol=1e-5)


def test_attention_saved_probs_of_wrong_shape_rejected(kernel) -> None:
    qkv = _qkv(2, 9, 1, 8, "dense")
    _, probs = kernel.attention_forward_probs(qkv, 1.0)
    dout = torch.randn(2, 1, 9, 8)
    with pytest.raises(RuntimeError, match="saved probabilities must be contiguous fp32"):
        kernel.attention_backward(qkv, dout, 1.0, probs[:, :, :, :9])


def test_attention_hand_computed(kernel) -> None:
    """Two tokens, one head, head dim 8 of which two channels are non-zero: the weights are a two-way softmax.
    Token 0: logits 0.5 * (2, 0) -> (e/(e+1), 1/(e+1)); token 1: 0.5 * (0, 2) -> (1/(1+e), e/(1+e))."""
    qkv = torch.zeros(1, 2, 3, 1, 8)  # B, N, 3, H, hd
    qkv[0, :, 0, 0, :2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # q
    qkv[0, :, 1, 0, :2] = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # k
    v = torch.tensor([[1.0, -1.0], [3.0, 5.0]])
    qkv[0, :, 2, 0, :2] = v
    out = kernel.attention_forward(qkv, 0.5)[0, :, 0]  # N, hd
    e = math.e
    w0 = torch.tensor([e / (e + 1), 1 / (e + 1)])
    expected = torch.stack([w0 @ v, w0.flip(0) @ v])
    torch.testing.assert_close(out[:, :2], expected, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(out[:, 2:]) == 0


def _gelu_inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4
    flat = x.view(-1)
    edge = torch.tensor([0.0, -30.0, 30.0, -200.0, 1e-4, -1e-4, -0.75])  # saturated tails, the origin, the dip
    flat[: min(len(edge), flat.numel())] = edge[: flat.numel()]
    return x


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("rows,cols", [(1, 5), (5, 37), (64, 256), (300, 200)])  # tails; several parallel chunks
def test_bias_gelu_matches_fp64(kernel, approximate, rows, cols) -> None:
    h = _gelu_inputs((rows, cols))
    bias = torch.randn(cols, generator=torch.Generator().manual_seed(1))
    exact = F.gelu(h.double() + bias.double(), approximate=approximate)
    out = kernel.bias_gelu_(h, bias, approximate)
    assert out.data_ptr() == h.data_ptr()  # in place: the matmul's output is overwritten
    torch.testing.assert_close(h.double(), exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 65, 256), (300, 72)])  # one vector; the CIFAR fc1; many chunks
def test_bias_gelu_training_pass_matches_fp64(kernel, approximate, shape) -> None:
    """fc1's epilogue in training: gelu(z + bias) forward, and (dz, dbias) backward in one pass, against float64
    autograd of the same expression."""
    g = torch.Generator().manual_seed(5)
    z, bias, grad = _gelu_inputs(shape), torch.randn(shape[-1], generator=g), torch.randn(shape, generator=g)
    z_before = z.clone()
    h = kernel.bias_gelu_forward(z, bias, approximate)
    dz, dbias = kernel.bias_gelu_backward(grad, z, bias, approximate)
    assert torch.equal(z, z_before)  # z is read, not overwritten: the backward needs it
    zl, bl = z.double().requires_grad_(), bias.double().requires_grad_()
    exact = F.gelu(zl + bl, approximate=approximate)
    exact.backward(grad.double())
    torch.testing.assert_close(h.double(), exact.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dz.double(), zl.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dbias.double(), bl.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 8), (4, 65, 128), (2, 3, 20)])  # 20: a partial vector in the forward
def test_bias_residual_pass_matches_fp64(kernel, masked, shape) -> None:
    """proj's and fc2's epilogue in training: x + scale[b] (y + bias), and its (dy, dbias), against float64."""
    g = torch.Generator().manual_seed(6)
    x, y, bias = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    scale = (torch.rand(shape[0], generator=g) < 0.5).float() / 0.5 if masked else None
    out = kernel.bias_residual_forward(x, y, bias, scale)
    s = (scale if masked else torch.ones(shape[0])).double().view(-1, 1, 1)
    torch.testing.assert_close(out.double(), x.double() + s * (y.double() + bias.double()), atol=1e-6, rtol=1e-6)
    if shape[-1] % 8:
        return  # the backward takes whole vectors only (widths are multiples of 8 on this path)
    grad = torch.randn(shape, generator=g)
    dy, dbias = kernel.bias_residual_backward(grad, scale)
    torch.testing.assert_close(dy.double(), grad.double() * s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dbias.double(), (grad.double() * s).sum((0, 1)), atol=1e-4, rtol=1e-5)
    if not masked:
        assert dy.data_ptr() == grad.data_ptr()  # no copy where nothing scales the gradient


@pytest.mark.parametrize("n", [1, 37, 16 * 1024 * 3 + 5])  # a partial vector; several parallel chunks
def test_gelu_tanh_and_gradient_match_fp64(kernel, n) -> None:
    x = _gelu_inputs((n,))
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    leaf = x.double().requires_grad_()
    exact = F.gelu(leaf, approximate="tanh")
    exact.backward(grad.double())
    torch.testing.assert_close(kernel.gelu_tanh_forward(x).double(), exact.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel.gelu_tanh_backward(grad, x).double(), leaf.grad, atol=1e-5, rtol=1e-5)


def test_gelu_tanh_known_values(kernel) -> None:
    """GELU_tanh(1) = 0.5 (1 + tanh(sqrt(2/pi) 1.044715)) = 0.841192; odd part: GELU(-1) = GELU(1) - 1; x for large
    x, 0 far below; slope 1/2 at 0."""
    g1 = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))
    assert abs(g1 - 0.841192) < 1e-6
    y = kernel.gelu_tanh_forward(torch.tensor([1.0, 0.0, 10.0, -10.0, -1.0]))
    torch.testing.assert_close(y, torch.tensor([g1, 0.0, 10.0, 0.0, g1 - 1.0]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kernel.gelu_tanh_backward(torch.ones(1), torch.zeros(1)), torch.tensor([0.5]))


def test_bad_input_names_the_argument(kernel) -> None:
    qkv = torch.randn(1, 4, 3, 2, 8)
    with pytest.raises(RuntimeError, match="qkv must be an fp32 CPU tensor"):
        kernel.attention_forward(qkv.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match="qkv must be an fp32 CPU tensor"):
        kernel.attention_forward(qkv[:, :, 0], 1.0)  # 4-D: q, k and v not separated
    with pytest.raises(RuntimeError, match="dense last dimension"):
        kernel.attention_forward(torch.randn(1, 4, 3, 8, 2).transpose(-1, -2), 1.0)
    with pytest.raises(RuntimeError, match="head dimension must be a multiple of 8, got 12"):
        kernel.attention_forward(torch.randn(1, 4, 3, 2, 12), 1.0)
    with pytest.raises(RuntimeError, match=r"grad_output must be fp32 \(B, H, N, hd\)"):
        kernel.attention_backward(qkv, torch.randn(1, 4, 2, 8), 1.0)  # (B, N, H, hd) instead
    with pytest.raises(RuntimeError, match="approximate must be 'tanh' or 'none', got 'erf'"):
        kernel.bias_gelu_(torch.zeros(2, 8), torch.zeros(8), "erf")
    with pytest.raises(RuntimeError, match=r"h must be \(M, N\) and bias \(N\)"):
        kernel.bias_gelu_(torch.zeros(2, 8), torch.zeros(7), "tanh")
    with pytest.raises(RuntimeError, match="h must be a contiguous fp32 CPU tensor"):
        kernel.bias_gelu_(torch.zeros(2, 8).bfloat16(), torch.zeros(8), "tanh")
    with pytest.raises(RuntimeError, match="x must be a contiguous fp32 CPU tensor.*not contiguous"):
        kernel.gelu_tanh_forward(torch.zeros(8, 8).t())
    with pytest.raises(RuntimeError, match="grad_output must be a contiguous fp32"):
        kernel.gelu_tanh_backward(torch.zeros(4, dtype=torch.float16), torch.zeros(4))
    with pytest.raises(RuntimeError, match="does not match x"):
        kernel.gelu_tanh_backward(torch.zeros(3), torch.zeros(4))


def test_kernels_belong_to_the_path(kernel) -> None:
    x = torch.zeros(2)
    with fast.use("avx2"):
        assert fast.cpu_path() == "avx2"
        assert fast.kernels(x) is kernel
        assert fast.kernels(torch.zeros(2, device="meta")) is None  # not on the CPU
    with fast.use("plain"):
        assert fast.cpu_path() == "plain" and fast.kernels(x) is None
    with pytest.raises(ValueError, match="path must be one of avx512-bf16, avx2, plain, got 'avx3'"):
        with fast.use("avx3"):
            pass


# ------------------------------------------------------------------------------ where fast.py takes the kernels
@pytest.mark.parametrize("tokens,hd,grad,dropout,taken", [
    (65, 32, True, 0.0, True),
    (128, 8, True, 0.0, True),      # the longest sequence it takes
    (129, 8, True, 0.0, False),     # longer: SDPA's kernel is faster there
    (13, 12, True, 0.0, False),     # head dim off the 8-wide vectors
    (13, 8, False, 0.0, False),     # inference: its forward alone only equals SDPA's
    (13, 8, True, 0.5, False),      # dropout on the probabilities: SDPA
])
def test_attention_takes_the_kernel_only_where_it_applies(kernel, tokens, hd, grad, dropout, taken) -> None:
    base = torch.randn(3, tokens, 3, 1, hd)
    qkv = base.clone().requires_grad_(grad)
    with fast.use("avx2"):
        out = fast.attention(qkv, dropout)
    assert ("Fp32AttentionBackward" in autograd_nodes(out)) == taken
    if dropout:
        return
    exact = _exact_attention(base, hd**-0.5)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    if grad:
        dout = torch.randn(out.shape)
        out.backward(dout)
        leaf = base.double().requires_grad_()
        _exact_attention(leaf, hd**-0.5).backward(dout.double())
        torch.testing.assert_close(qkv.grad.double(), leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate,dtype,layout,taken", [
    ("tanh", torch.float32, "contiguous", True),
    ("none", torch.float32, "contiguous", False),   # PyTorch's erf GELU is already fast
    ("tanh", torch.bfloat16, "contiguous", False),  # the avx2 build is fp32 only
    ("tanh", torch.float32, "transposed", False),
])
def test_gelu_takes_the_kernel_only_where_it_applies(kernel, approximate, dtype, layout, taken) -> None:
    base = torch.randn(6, 40) * 3
    h = (base if layout == "contiguous" else base.t().contiguous().t()).to(dtype).requires_grad_()
    act = nn.GELU(approximate=approximate)
    with fast.use("avx2"):
        y = fast.gelu(h, act)
    assert ("_KernelGeluBackward" in autograd_nodes(y)) == taken
    grad = torch.randn(y.shape).to(dtype)
    y.backward(grad)
    leaf = h.detach().double().requires_grad_()
    exact = F.gelu(leaf, approximate=approximate)
    exact.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), exact.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(h.grad.double(), leaf.grad, atol=tol, rtol=tol)


def test_block_inference_applies_to_fp32_inference_only(kernel) -> None:
    block = Block(32, 2, 64).eval()
    x = torch.randn(2, 9, 32)
    with fast.use("plain"), torch.no_grad():
        reference = block(x)
    with fast.use("avx2"):
        with torch.no_grad():
            fused = fast.block_inference(block, x)
            assert fast.block_inference(block, x.bfloat16()) is None
            with torch.autocast("cpu", torch.bfloat16):
                assert fast.block_inference(block, x) is None
        assert fast.block_inference(block, x) is None  # autograd on: the plain ops, which it records
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_block_train_matches_plain_with_drop_path(kernel, gelu) -> None:
    """A training block with drop-path: the fused passes drop the same samples as ``DropPath`` from the same seed
    (the output and every gradient equal the plain path's), and some samples really are dropped."""
    block = Block(32, 2, 64, gelu=gelu, drop_path=0.5).train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(6, 9, 32)
    out, grads, nodes = {}, {}, {}
    for path in ("avx2", "plain"):
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        torch.manual_seed(3)
        with fast.use(path):
            out[path] = block(leaf)
        out[path].square().sum().backward()
        grads[path] = [leaf.grad] + [p.grad.clone() for p in block.parameters()]
        nodes[path] = autograd_nodes(out[path])
    assert "_BiasResidualBackward" in nodes["avx2"] and "_BiasResidualBackward" not in nodes["plain"]
    torch.testing.assert_close(out["avx2"], out["plain"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["avx2"], grads["plain"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The comparison means something only if seed 3 drops some samples and keeps others (scaled by 1/(1-p)).
    torch.manual_seed(3)
    kept = fast._drop_path_scale(block.drop_path, x)
    assert kept is not None and set(kept.tolist()) <= {0.0, 2.0} and 0 < kept.count_nonzero() < 6


def test_block_train_applies_to_fp32_autograd_on_avx2_only(kernel) -> None:
    block = Block(32, 2, 64).train()
    x = torch.randn(2, 9, 32)
    with fast.use("avx2"):
        assert fast.block_train(block, x) is not None
        assert fast.block_train(block, x.bfloat16()) is None
        assert fast.block_train(block, x, queries=1) is None  # the class-token-only last block: plain ops
        with torch.autocast("cpu", torch.bfloat16):
            assert fast.block_train(block, x) is None
        with torch.no_grad():
            assert fast.block_train(block, x) is None
    with fast.use("plain"):
        assert fast.block_train(block, x) is None
    dropout = Block(32, 2, 64, dropout=0.1).train()
    with fast.use("avx2"):
        assert fast.block_train(dropout, x) is None


# ------------------------------------------------------------------------------------------- the whole model
CONFIGS = {
    "token-tanh": ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5),
    "gap-exact": ViTConfig(image_size=16, patch_size=4, width=48, depth=2, num_heads=3, mlp_dim=72, num_classes=3,
                           classifier="gap", gelu="exact"),
    "hybrid-tanh": ViTConfig(image_size=16, patch_size=1, width=32, depth=2, num_heads=4, mlp_dim=40, num_classes=4,
                             backbone=ResNetConfig(layers=(1, 1), width_factor=0.5)),
}


def tiny_model(name: str) -> VisionTransformer:
    model = VisionTransformer(CONFIGS[name])
    with torch.no_grad():  # a non-zero head and biases, so that every term of every layer matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_inference_matches_plain(kernel, name) -> None:
    model = tiny_model(name).eval()
    x = torch.randn(3, 3, 16, 16)
    logits = {}
    names = {}
    for path in ("avx2", "plain"):
        with fast.use(path), torch.no_grad(), OpNames() as ops:
            # Every block on every token (``model(x)`` computes the class token alone in the last block).
            logits[path] = model.forward_head(model.forward_features(x))
        names[path] = ops.names
    # avx2: bias + GELU in the C++ pass (no aten.gelu), output projections accumulated into the residual stream.
    assert "aten.gelu" not in names["avx2"] and "aten.addmm_" in names["avx2"]
    assert "aten.gelu" in names["plain"] and "aten.addmm_" not in names["plain"]
    torch.testing.assert_close(logits["avx2"], logits["plain"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_training_gradients_match_plain(kernel, name) -> None:
    model = tiny_model(name).train()
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 2, 1])
    grads, nodes = {}, {}
    for path in ("avx2", "plain"):
        model.zero_grad()
        with fast.use(path):
            out = model(x)
            F.cross_entropy(out, labels).backward()
        nodes[path] = autograd_nodes(out)
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The blocks' fused passes ran (GELU of either form inside _BiasGelu), and none of them on the plain path.
    fused = {"Fp32AttentionBackward", "_BiasGeluBackward", "_BiasResidualBackward"}
    assert fused <= nodes["avx2"] and "GeluBackward0" not in nodes["avx2"]
    assert not fused & nodes["plain"]
    assert len(grads["avx2"]) == len(list(model.parameters()))
    for n, g in grads["avx2"].items():
        assert torch.count_nonzero(g) > 0, n  # every parameter takes part
        torch.testing.assert_close(g, grads["plain"][n], atol=1e-5, rtol=1e-5, msg=n)


def test_without_the_kernels_the_avx2_path_still_matches_plain() -> None:
    """With ``VITLAB_CPU_KERNELS=0`` (in a fresh process: the kernels are loaded once) the avx2 path keeps its MKL
    inference block, with PyTorch's bias and GELU, and trains through SDPA; both still equal the plain path."""
    script = """
import json, torch
import torch.nn.functional as F
from tests.model.opnames import OpNames, autograd_nodes
from tests.model.test_fast_avx2 import tiny_model
from vitlab.model import cpu_kernels, fast
torch.set_num_threads(1)
model, x = tiny_model("token-tanh"), torch.randn(2, 3, 16, 16)
out = {"kernels": cpu_kernels.fp32_kernels() is not None}
logits, grads = {}, {}
for path in ("avx2", "plain"):
    with fast.use(path):
        with torch.no_grad(), OpNames() as ops:
            logits[path] = model.eval()(x)
        model.zero_grad()
        y = model.train()(x)
        y.logsumexp(-1).sum().backward()
    grads[path] = [p.grad.clone() for p in model.parameters()]
    out[path] = {"ops": sorted(ops.names), "nodes": sorted(autograd_nodes(y))}
out["logits"] = float((logits["avx2"] - logits["plain"]).abs().max())
out["grads"] = max(float((a - b).abs().max()) for a, b in zip(grads["avx2"], grads["plain"]))
print(json.dumps(out))
"""
    env = {**os.environ, "VITLAB_CPU_KERNELS": "0"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernels"] is False
    assert "aten.addmm_" in result["avx2"]["ops"] and "aten.gelu" in result["avx2"]["ops"]
    assert "Fp32AttentionBackward" not in result["avx2"]["nodes"]
    assert result["logits"] < 1e-5 and result["grads"] < 1e-5
