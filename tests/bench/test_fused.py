"""The avx512-bf16 path's fused oneDNN inference of the encoder blocks computes the same function as the plain
PyTorch ops (and as timm), is taken only where it should be, and leaves training untouched; the sliced attention
(the path's torch-op attention for short bf16 sequences) against SDPA."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.model.opnames import OpNames
from vitlab.bench.models import build_pair
from vitlab.model import ViTConfig, VisionTransformer, fast

CONFIGS = {
    "token-exact": ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5,
                             gelu="exact"),
    "gap-tanh": ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=48, num_classes=3,
                          classifier="gap", gelu="tanh"),
}
needs_bf16_path = pytest.mark.skipif(not fast.available("avx512-bf16"), reason="this CPU cannot take the "
                                     "avx512-bf16 path (it needs AVX512-BF16 or AMX, with torch on its AVX-512 code "
                                     "path)")


def _model(name: str) -> VisionTransformer:
    model = VisionTransformer(CONFIGS[name]).eval()
    with torch.no_grad():  # non-zero head and biases so every fused term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _run(model: VisionTransformer, x: torch.Tensor, fused: bool, autocast: bool = False) -> tuple[torch.Tensor, set]:
    with torch.no_grad(), fast.use("avx512-bf16" if fused else "plain"), OpNames() as ops, \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model.forward_head(model.forward_features(x))  # every block on every token
    return out.float(), ops.names


@needs_bf16_path
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_fused_equals_plain(name: str) -> None:
    model = _model(name)
    x = torch.randn(3, 3, 16, 16)
    fused, ops = _run(model, x, True)
    plain, plain_ops = _run(model, x, False)
    assert "mkldnn._linear_pointwise" in ops and "aten.gelu" not in ops
    assert "mkldnn._linear_pointwise" not in plain_ops
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


@needs_bf16_path
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_weights_and_autocast_fused_match_fp32_within_bf16_tolerance(name: str) -> None:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 support")
    model = _model(name)
    x = torch.randn(3, 3, 16, 16)
    reference, _ = _run(model, x, False)
    auto_fused, ops = _run(model, x, True, autocast=True)
    auto_plain, _ = _run(model, x, False, autocast=True)
    assert "mkldnn._linear_pointwise" in ops
    half = copy.deepcopy(model).to(torch.bfloat16)
    w_fused, _ = _run(half, x.bfloat16(), True)
    w_plain, _ = _run(half, x.bfloat16(), False)
    scale = reference.abs().max()
    for got, plain in ((auto_fused, auto_plain), (w_fused, w_plain)):
        # bf16 keeps 8 mantissa bits: both paths are within a few bf16 steps of fp32 and of each other.
        assert (got - reference).abs().max() <= 0.05 * scale
        assert (got - plain).abs().max() <= 0.05 * scale


def test_fused_vitlab_matches_timm() -> None:
    config = CONFIGS["token-exact"]
    ours, theirs = build_pair(config)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@needs_bf16_path
def test_training_and_grad_take_the_plain_path() -> None:
    model = _model("token-exact")
    x = torch.randn(2, 3, 16, 16)
    with fast.use("avx512-bf16"), OpNames() as ops:
        out = model(x)  # grad enabled
    assert "mkldnn._linear_pointwise" not in ops.names
    out.sum().backward()
    assert model.blocks[0].mlp.fc1.weight.grad is not None
    model.train()
    with fast.use("avx512-bf16"), torch.no_grad(), OpNames() as ops:
        model(x)
    assert "mkldnn._linear_pointwise" not in ops.names


def test_intermediates_still_match_forward() -> None:
    model = _model("gap-tanh")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.intermediates(x)["logits"], model(x), atol=1e-5, rtol=1e-5)


def _attention_grads(fn, base: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and qkv gradient of ``fn(qkv)``, qkv (B, N, 3, H, hd) as the model's projection makes it."""
    qkv = base.clone().requires_grad_()
    out = fn(qkv)
    out.backward(grad)
    return out.detach(), qkv.grad


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(*fast.split_heads(qkv))


@pytest.mark.parametrize("slice_elements", [2**18, 2 * 7 * 7 * 2])  # whole batch; two samples per slice
def test_sliced_attention_backward_is_the_softmax_attention_gradient(monkeypatch, slice_elements) -> None:
    """``SlicedAttention`` in torch ops (fp64 here, which no C++ kernel takes) is softmax attention, forward and
    backward, however the batch is sliced."""
    monkeypatch.setattr(fast, "BACKWARD_ELEMENTS", slice_elements)
    monkeypatch.setattr(fast, "FORWARD_ELEMENTS", slice_elements)
    base = torch.randn(5, 7, 3, 2, 8, dtype=torch.float64)  # B, N, 3, H, hd (5: the last slice is partial)
    grad = torch.randn(5, 2, 7, 8, dtype=torch.float64)
    with fast.use("plain"):
        out, g = _attention_grads(fast.SlicedAttention.apply, base, grad)
    ref_out, ref_g = _attention_grads(_sdpa, base, grad)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(g, ref_g)


@pytest.mark.parametrize("batch,tokens,heads", [(8, 36, 4), (4, 64, 3), (2, 197, 6)])
def test_sliced_attention_forward_bf16_error_is_that_of_the_fused_kernel(monkeypatch, batch, tokens, heads) -> None:
    """The inference/training forward that replaces SDPA's CPU kernel for short bf16 sequences: on the model's
    strided q, k, v views, in slices of two samples, its error against fp64 is the fused kernel's (both keep the
    logits and softmax in fp32 and round the probabilities once)."""
    monkeypatch.setattr(fast, "FORWARD_ELEMENTS", 2 * heads * tokens * tokens)
    base = torch.randn(batch, tokens, 3, heads, 64).bfloat16()
    q, k, v = fast.split_heads(base)  # B, H, N, hd views, as Attention makes them
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = fast.sliced_attention(q, k, v)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == torch.bfloat16 and ours.shape == fused.shape
    err_ours = float((ours.double() - exact).norm() / exact.norm())
    err_fused = float((fused.double() - exact).norm() / exact.norm())
    assert err_ours <= 1.2 * err_fused, (err_ours, err_fused)


@pytest.mark.parametrize("batch,tokens,heads", [(4, 64, 3), (2, 197, 6)])  # CIFAR-sized; ViT-S/16 at 224
def test_sliced_attention_bf16_gradient_error_is_that_of_the_fused_kernel(batch, tokens, heads) -> None:
    """The torch-op backward of ``SlicedAttention`` (what the avx512-bf16 path runs where its C++ kernel does not
    apply): its bf16 error against fp64 is within twice that of SDPA's fused kernel."""
    base = torch.randn(batch, tokens, 3, heads, 64)
    grad = torch.randn(batch, heads, tokens, 64)
    _, exact = _attention_grads(_sdpa, base.bfloat16().double(),
                                grad.bfloat16().double())
    with fast.use("plain"):
        _, ours = _attention_grads(fast.SlicedAttention.apply, base.bfloat16(), grad.bfloat16())
    _, fused = _attention_grads(_sdpa, base.bfloat16(), grad.bfloat16())
    err_ours = (ours.double() - exact).abs().max()
    err_fused = (fused.double() - exact).abs().max()
    assert err_ours <= 2 * err_fused + 1e-3, (err_ours, err_fused)


@needs_bf16_path
def test_bf16_training_uses_it_only_for_short_sequences() -> None:
    model = VisionTransformer(CONFIGS["gap-tanh"]).train()
    x = torch.randn(2, 3, 16, 16)
    with fast.use("avx512-bf16"), OpNames() as ops, torch.autocast("cpu", torch.bfloat16):
        model(x).sum().backward()
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" not in ops.names
    assert "aten.bmm" in ops.names or "aten.matmul" in ops.names or "aten.mm" in ops.names
    long_seq = VisionTransformer(CONFIGS["gap-tanh"].replace(image_size=68)).train()  # 289 tokens > 256
    with fast.use("avx512-bf16"), OpNames() as ops, torch.autocast("cpu", torch.bfloat16):
        long_seq(torch.randn(1, 3, 68, 68)).sum().backward()
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in ops.names


@needs_bf16_path
def test_autocast_weight_copies_follow_weight_updates() -> None:
    model = _model("token-exact")
    x = torch.randn(2, 3, 16, 16)
    first, _ = _run(model, x, True, autocast=True)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(2.0)  # in place: the cached bf16 copy must be refreshed
        model.blocks[1].attn.qkv.bias.add_(0.5)
    second, _ = _run(model, x, True, autocast=True)
    plain, _ = _run(model, x, False, autocast=True)
    assert (first - second).abs().max() > 1e-2
    assert (second - plain).abs().max() <= 0.05 * plain.abs().max()


@needs_bf16_path
@pytest.mark.parametrize("fused", [True, False])
def test_cached_weights_follow_optimizer_steps(fused) -> None:
    """torch's fused optimisers write parameters without bumping their version counters: the cache must still see
    the step (it once did not, and evaluations during training used the weights of the first evaluation)."""
    model = _model("token-exact")
    x = torch.randn(2, 3, 16, 16)
    first, _ = _run(model, x, True, autocast=True)
    versions = [p._version for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    if fused:
        assert versions == [p._version for p in model.parameters()]  # the premise: no version bump
    second, _ = _run(model, x, True, autocast=True)
    plain, _ = _run(model, x, False, autocast=True)
    assert (first - second).abs().max() > 1e-2
    assert (second - plain).abs().max() <= 0.05 * plain.abs().max()


@needs_bf16_path
def test_model_with_cached_weights_still_copies_and_pickles() -> None:
    import pickle

    model = _model("gap-tanh")
    x = torch.randn(2, 3, 16, 16)
    before, _ = _run(model, x, True, autocast=True)
    twin = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    for m in (twin, again):
        out, _ = _run(m, x, True, autocast=True)
        torch.testing.assert_close(out, before)
    assert set(twin.state_dict()) == set(model.state_dict())


def test_bf16_training_gradients_match_timm() -> None:
    config = CONFIGS["gap-tanh"]
    ours, theirs = build_pair(config)
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for model in (ours.train(), theirs.train()):
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        ref = grads[1][name]
        assert (g - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-6, name


class _LinearRows(OpNames):
    """Also records the row count of every oneDNN linear's input."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == "mkldnn._linear_pointwise":
            self.rows.append(args[0].shape[0])
        return super().__torch_dispatch__(func, types, args, kwargs)


@needs_bf16_path
@pytest.mark.parametrize("autocast", [False, True])
def test_class_token_rows_of_the_last_block_take_the_fused_path(autocast: bool) -> None:
    """``model(x)`` computes the last block for the class token alone through the same oneDNN ops (cached
    weights, no per-call casts): after the qkv matmul on every token, the last block's three other Dense layers
    see one row per image; the logits are those of every block on every token."""
    model = _model("token-exact")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad(), fast.use("avx512-bf16"), _LinearRows() as ops, \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(x).float()
    full, _ = _run(model, x, True, autocast=autocast)
    tokens = 1 + 16  # class token + 4x4 patches
    assert ops.rows == [3 * tokens] * 4 + [3 * tokens] + [3] * 3  # block 0: four Dense layers; block 1: qkv, then 3
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(logits, full, atol=tol, rtol=tol)
