"""The Transformer encoder's layers (paper Sec. 3.1, Eq. 1-4): patch embedding, multi-head self-attention, the
GELU MLP, and the pre-norm residual block that combines them."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from vitlab.model import cpu_kernels

# ------------------------------------------------------------------------------------- fused CPU inference
# Without autograd on CPU, the Dense layers run as oneDNN matmuls with the bias, the GELU (MLP) and the residual
# addition (attention output and MLP output projections) fused into the matmul's epilogue: the same function,
# but the activations are no longer re-read from memory by separate bias/GELU/add passes. This is what inductor's
# freezing pass emits; doing it eagerly makes un-compiled vitlab inference faster (measured in docs/speed.md).
# Training, autograd, torch.compile/export tracing and other devices take the plain PyTorch ops, except that
# CUDA autocast inference reuses the cached low-precision weights (``_cuda_cast_dtype``).
_FUSED_ENABLED = True


@contextlib.contextmanager
def fused_cpu_inference(enabled: bool) -> Iterator[None]:
    """Turn the fused oneDNN inference path on or off inside a ``with`` block (e.g. to count FLOPs with
    ``FlopCounterMode``, which has no formula for the fused ops)."""
    global _FUSED_ENABLED
    old, _FUSED_ENABLED = _FUSED_ENABLED, enabled
    try:
        yield
    finally:
        _FUSED_ENABLED = old


def _onednn_ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_ops_available()


def _tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: they must see ordinary ops, so the fused paths and vitlab's
    C++ kernels step aside."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _eager_inference() -> bool:
    """Whether the inference fast paths may run: switched on, no autograd, and not being traced."""
    return _FUSED_ENABLED and not torch.is_grad_enabled() and not _tracing()


def _fused_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused path computes in for input ``x``, or None when the plain ops must run."""
    if not (_ONEDNN and x.device.type == "cpu" and _eager_inference()):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16:
            return None
    else:
        dtype = x.dtype
        if weight.dtype != dtype:
            return None
    if dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return dtype
    return None


def _cuda_cast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when a CUDA inference forward may use cached low-precision weights, else None.

    On a GPU, autocast casts every Dense weight and bias again on each forward: two extra kernels per layer,
    which at batch 1 (launch-bound) cost ViT-S/16 more than timm's whole latency gap. With the weights cast once
    (``_weights_as``), the layers compute bit for bit what autocast computes; only the casts are gone.
    """
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and _eager_inference():
        return torch.get_autocast_dtype("cuda")
    return None


def _cast_linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    return F.linear(x, *_weights_as(linear, dtype))


# Optimiser steps seen so far, by any torch.optim optimiser: part of the cache key below, because torch's fused
# optimisers (``fused=True``, as vitlab's training uses) update parameters in place without bumping their version
# counters, which would otherwise leave a stale bf16 copy in use after training steps.
_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _weights_as(linear: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias for a ``dtype`` matmul. Low-precision copies are kept on the layer (on the CPU
    prepacked for oneDNN) until the parameters change (version counter, storage or an optimiser step): under
    autocast this saves the cast autocast repeats on every call (for ViT-B/16 it reads 344 MB and writes 172 MB
    per forward). The copy costs one bf16 copy of the Dense weights while the model is used for bf16 inference."""
    w, b = linear.weight, linear.bias
    if dtype == torch.float32 or (w.dtype == dtype and w.device.type != "cpu"):
        return w, b  # fp32: oneDNN's fp32 matmul takes the plain layout at no cost; a GPU needs no packing
    key = (dtype, _optimizer_steps, w._version, w.data_ptr(), None if b is None else (b._version, b.data_ptr()))
    cache = linear.__dict__.setdefault("_vitlab_cast", _CastCache())
    if cache.key != key:
        cast = w.detach().to(dtype)
        if w.device.type == "cpu":
            # Stored in oneDNN's blocked layout, so the matmul does not reorder the weight on every call either
            # (ViT-B/16 fc1 at 3152 tokens: 36.5 ms instead of 40.1 ms on 2 threads; results bit-identical).
            cast = torch.ops.mkldnn._reorder_linear_weight(cast, None)
        cache.key, cache.weight, cache.bias = key, cast, None if b is None else b.detach().to(dtype)
    return cache.weight, cache.bias


class _CastCache:
    """Holder of a layer's cached low-precision weights; copies and pickles empty (the cache is derived data,
    and oneDNN's opaque tensors can be neither deep-copied nor pickled)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> "_CastCache":
        return _CastCache()

    def __reduce__(self) -> tuple:
        return (_CastCache, ())


def _fused_linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype, post: str = "none",
                  algorithm: str = "") -> torch.Tensor:
    """``post(linear(x))`` as one oneDNN call; ``post`` is "none" or "gelu" (``algorithm`` "none" = erf, "tanh")."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # M, K
    w, b = _weights_as(linear, dtype)
    out = torch.ops.mkldnn._linear_pointwise(x2, w, b, post, [], algorithm)  # M, N
    return out.reshape(*lead, out.shape[-1])


def _fused_linear_add(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``residual + linear(x)``, the addition fused into the matmul when the residual has the compute dtype
    (outside autocast); under autocast the residual stream is fp32 and is added after, as autocast would."""
    if residual.dtype != dtype or linear.weight.dtype != dtype:
        # Also under autocast without a position embedding: the stream stays bf16 but the weights are fp32.
        return residual + _fused_linear(x, linear, dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # M, K
    r2 = residual.reshape(-1, residual.shape[-1])  # M, N
    w, b = _weights_as(linear, dtype)
    out = torch.ops.mkldnn._linear_pointwise.binary(x2, r2, w, b, "add")
    return out.reshape(*lead, out.shape[-1])


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each linearly (a strided convolution)."""

    def __init__(self, patch_size: tuple[int, int], in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # B, D, gh, gw
        return x.flatten(2).transpose(1, 2)  # B, N, D (grid row-major, as the official code)


def _cpu_kernel_for(q: torch.Tensor):
    """vitlab's C++ attention kernel (``vitlab.model.cpu_kernels``) where it applies: bf16 on the CPU, head
    dimension a multiple of 16, outside ``torch.compile``/export tracing (which must see ordinary ops). None
    elsewhere, or where it is unavailable."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-1] % 16 or _tracing():
        return None
    if q.stride(-1) != 1 or any(st % 2 for st in q.stride()[:-1]) or q.storage_offset() % 2:
        return None  # it reads rows as bf16 pairs; the model's q, k, v views always qualify
    return cpu_kernels.kernels()


def _short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for low-precision (B, H, N, hd) inputs on the CPU: the C++ kernel for bf16
    (one fused pass per sample and head, output already in the (B, N, H, hd) layout the output projection reads),
    else ``_sliced_attention``. Both keep logits and softmax in fp32 and round the probabilities once."""
    kernel = _cpu_kernel_for(q)
    if kernel is None:
        return _sliced_attention(q, k, v)
    return kernel.attention_forward(q, k, v, q.shape[-1] ** -0.5)


def _sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for low-precision (B, H, N, hd) inputs on the CPU, as batched matmuls over
    slices of the batch: logits and softmax in fp32 (the precision of SDPA's fused kernel, which accumulates in
    fp32 too), probabilities rounded once for the matmul with ``v``.

    On 2 threads this is faster than SDPA's CPU kernel at every shape vitlab runs: bf16 ViT-S/16 at batch 16,
    8.3 vs 9.3 ms per layer; ViT-B/16 at batch 4, 3.7 vs 4.3 ms; the CIFAR model's 64 tokens at batch 128, 3.6 vs
    4.4 ms, and 1.5 vs 2.5 ms at 36 tokens (``scripts/attention_timing.py``, q, k and v as the strided
    views the model makes). Slices of at most ``_FORWARD_ELEMENTS`` probabilities keep the (N, N) temporaries in
    cache.
    """
    B, H, N, hd = q.shape
    scale = hd**-0.5
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    step = max(1, _FORWARD_ELEMENTS // (H * N * N))
    dense = torch.contiguous_format  # q, k, v are usually strided views of one qkv tensor; matmuls want them dense
    for start in range(0, B, step):
        s = slice(start, start + step)
        qs, ks = (t[s].to(acc, memory_format=dense) for t in (q, k))
        logits = torch.matmul(qs, ks.transpose(-2, -1)).mul_(scale)  # b, H, N, N
        torch.matmul(torch.softmax(logits, dim=-1).to(q.dtype), v[s].contiguous(), out=out[s])
    return out


class _ReducedPrecisionAttention(torch.autograd.Function):
    """Softmax attention of the qkv projection's output (B, N, 3, H, hd), returning (B, H, N, hd), whose forward is
    ``_short_attention`` and whose backward recomputes the (B, H, N, N) probabilities, in fp32 where it matters
    (logits, softmax, their gradient): in the C++ kernel where ``_cpu_kernel_for`` finds it (bf16, AVX512-BF16),
    else with batched matmuls over slices of the batch. Taking qkv whole lets the backward hand back one gradient
    in qkv's own layout, where separate dq, dk, dv would be stacked and re-laid out by autograd (two copies).

    Used for bf16/fp16 training on CPU with short sequences, where PyTorch's fused flash-attention backward runs
    at a fraction of the matmul rate. Forward+backward on 2 threads (``scripts/attention_timing.py``, docs/speed.md),
    SDPA / torch-op path / kernel: 40.4 / 16.0 / 6.9 ms for the CIFAR model's 64 tokens (batch 128, 4 heads),
    35.2 / 6.6 / 3.1 ms at its 36, and 54.1 / 29.1 / 14.6 ms for ViT-S/16's 197 (batch 16, 6 heads). Longer
    sequences keep the fused kernel (``_SHORT_SEQUENCE``): one sample's (N, N) temporaries grow as N^2. It saves
    less than the fused kernel (qkv, without its output and log-sum-exp). The torch-op backward walks the batch
    in slices of at most ``_BACKWARD_ELEMENTS`` probabilities, so its (N, N) temporaries stay a few MB
    (whole-batch temporaries made the CIFAR model's training peak 8% above timm's) and stay in cache; the kernel
    holds one (sample, head) at a time.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qkv)
        return _short_attention(*_split_heads(qkv))

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> torch.Tensor:
        (qkv,) = ctx.saved_tensors
        q, k, v = _split_heads(qkv)
        B, H, N, hd = q.shape
        dt, scale = q.dtype, hd**-0.5
        kernel = _cpu_kernel_for(q)
        if kernel is not None:
            return kernel.attention_backward(q, k, v, do if do.stride(-1) == 1 else do.contiguous(), scale)
        acc = torch.promote_types(dt, torch.float32)
        dqkv = torch.empty(qkv.shape, dtype=dt, device=qkv.device)
        dq, dk, dv = _split_heads(dqkv)
        step = max(1, _BACKWARD_ELEMENTS // (H * N * N))
        for start in range(0, B, step):
            s = slice(start, start + step)
            # The logits in fp32: rounding them to bf16 would perturb the probabilities by ~|logit| * 2^-8.
            p = torch.softmax(torch.matmul(q[s].to(acc), k[s].to(acc).transpose(-2, -1)).mul_(scale), dim=-1)
            dv[s] = torch.matmul(p.to(dt).transpose(-2, -1), do[s])  # b, H, N, hd
            dp = torch.matmul(do[s], v[s].transpose(-2, -1)).to(acc)  # b, H, N, N
            # Softmax backward: ds = p * (dp - sum_j p_ij dp_ij), all in fp32, cast once for the matmuls.
            pdp = p * dp
            ds = pdp.sub_(p.mul_(pdp.sum(dim=-1, keepdim=True))).mul_(scale).to(dt)
            dq[s] = torch.matmul(ds, k[s])
            dk[s] = torch.matmul(ds.transpose(-2, -1), q[s])
        return dqkv


def _split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, each (B, H, N, hd), as views of the qkv projection's output (B, N, 3, H, hd)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


_BACKWARD_ELEMENTS = 2**18  # probabilities per backward slice: 1 MB in fp32
_FORWARD_ELEMENTS = 2**18  # per forward slice; 2^20 measured about the same, 2^22 up to 2x slower
_SHORT_SEQUENCE = 256  # measured faster than the fused backward at 64 and 197 tokens (docs/speed.md)


def _short_low_precision_on_cpu(t: torch.Tensor, tokens: int) -> bool:
    """Whether vitlab's attention beats SDPA's CPU kernel for ``tokens`` tokens of q, k, v like ``t``."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and tokens <= _SHORT_SEQUENCE


def _use_reduced_precision_attention(qkv: torch.Tensor, dropout: float) -> bool:
    """Whether training attention takes ``_ReducedPrecisionAttention``, for qkv (B, N, 3, H, hd)."""
    return (dropout == 0.0 and qkv.requires_grad and torch.is_grad_enabled()
            and _short_low_precision_on_cpu(qkv, qkv.shape[1])
            # torch.compile traces the Function too (compiled CIFAR bf16 training step 3.61 s vs 4.29 s with
            # the fused kernel's backward); export keeps the standard op.
            and not torch.compiler.is_exporting())


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    ``forward`` is the fast path (``scaled_dot_product_attention``, probabilities never materialised);
    ``forward_with_probs`` computes the same function explicitly and also returns the (B, H, N, N) probabilities.
    """

    def __init__(self, width: int, num_heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.attention_dropout = attention_dropout
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The (B, N, 3, H, hd) projection from ``project`` (default ``self.qkv``; the inference paths pass theirs)."""
        B, N, D = x.shape
        return (project or self.qkv)(x).reshape(B, N, 3, self.num_heads, self.head_dim)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, N, hd = o.shape
        o = o.transpose(1, 2).reshape(B, N, H * hd)  # B, N, D
        return self.proj_drop(self.proj(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self._qkv(x)
        p = self.attention_dropout if self.training else 0.0
        if _use_reduced_precision_attention(qkv, p):
            return self._out(_ReducedPrecisionAttention.apply(qkv))
        return self._out(F.scaled_dot_product_attention(*_split_heads(qkv), dropout_p=p))

    def _attend_no_grad(self, x: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Inference attention up to (not including) the output projection: (B, N, D), heads merged."""
        B, N, D = x.shape
        q, k, v = _split_heads(self._qkv(x, project))
        o = _short_attention(q, k, v) if _short_low_precision_on_cpu(q, N) else F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, N, D)

    def attend_fused(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fused-CPU-inference attention up to (not including) the output projection."""
        return self._attend_no_grad(x, lambda t: _fused_linear(t, self.qkv, dtype))

    def forward_cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``forward`` for CUDA autocast inference, with the Dense weights cast once (``_cuda_cast_dtype``)."""
        return _cast_linear(self._attend_no_grad(x, lambda t: _cast_linear(t, self.qkv, dtype)), self.proj, dtype)

    def forward_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = _split_heads(self._qkv(x))
        logits = (q * self.scale) @ k.transpose(-2, -1)  # B, H, N, N
        probs = logits.softmax(dim=-1)
        dropped = F.dropout(probs, self.attention_dropout, self.training)
        return self._out(dropped @ v), probs


def _gelu_kernel_for(h: torch.Tensor):
    """vitlab's C++ kernels where the tanh GELU of ``h`` may use them: a contiguous bf16 or fp32 CPU tensor, outside
    ``torch.compile``/export tracing; None elsewhere or where they are unavailable."""
    if h.device.type != "cpu" or h.dtype not in (torch.bfloat16, torch.float32) or not h.is_contiguous() \
            or _tracing():
        return None
    return cpu_kernels.kernels()


class _TanhGelu(torch.autograd.Function):
    """The tanh-approximation GELU through ``cpu_gelu.cpp`` (one pass each way, the same function as ``nn.GELU(
    approximate="tanh")`` within one rounding): PyTorch's own CPU tanh GELU runs at a third of its erf GELU's speed
    and took ~12% of the small-scratch preset's bf16 training step. Saves its input, as PyTorch's GELU does."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, kernel) -> torch.Tensor:
        ctx.kernel = kernel
        ctx.save_for_backward(h)
        return kernel.gelu_tanh_forward(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (h,) = ctx.saved_tensors
        return ctx.kernel.gelu_tanh_backward(grad.contiguous(), h), None


class Mlp(nn.Module):
    """Dense -> GELU -> Dense, dropout after each Dense (the official MlpBlock)."""

    def __init__(self, width: int, mlp_dim: int, gelu: str = "tanh", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        # The official code uses the tanh approximation; "exact" (erf) is what timm and HF compute.
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        kernel = _gelu_kernel_for(h) if self.act.approximate == "tanh" else None
        a = _TanhGelu.apply(h, kernel) if kernel is not None else self.act(h)
        return self.drop2(self.fc2(self.drop1(a)))

    def forward_cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``forward`` for CUDA autocast inference, with the Dense weights cast once (``_cuda_cast_dtype``)."""
        return _cast_linear(self.act(_cast_linear(x, self.fc1, dtype)), self.fc2, dtype)

    def hidden_fused(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """GELU(fc1(x)) as one fused oneDNN call (fused inference path)."""
        return _fused_linear(x, self.fc1, dtype, "gelu", self.act.approximate)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample, scaling survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)  # scale the (B, 1, ...) mask, not the activations: one pass over x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; under CPU bf16 autocast, where vitlab's C++ kernels run, as one pass that writes the bf16 the
    next Dense layer reads (``_LayerNormBf16``) instead of autocast's fp32 LayerNorm followed by a cast."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.is_contiguous() and norm.weight is not None
            and norm.bias is not None and norm.weight.dtype == torch.float32 and not _tracing()):
        kernel = cpu_kernels.kernels()
        if kernel is not None:
            return _LayerNormBf16.apply(x, norm.weight, norm.bias, norm.eps, kernel)
    return norm(x)


class _LayerNormBf16(torch.autograd.Function):
    """LayerNorm of fp32 ``x`` with a bf16 result (``cpu_layer_norm.cpp``): what autocast computes (LayerNorm in
    fp32, rounded to bf16 for the Dense layer that reads it), without the cast pass forward and the cast of the
    gradient back to fp32 in the backward. Those casts were 16 of the 25 full-size copies per step of the
    small-scratch preset's training. Saves what PyTorch's LayerNorm saves (x, mean, 1/std)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, kernel) -> torch.Tensor:
        y, mean, rstd = kernel.layer_norm_bf16_forward(x, weight, bias, eps)
        ctx.kernel = kernel
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = ctx.kernel.layer_norm_bf16_backward(grad.contiguous(), x, weight, mean, rstd)
        return dx, dweight, dbias, None, None


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (Eq. 2-3)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, qkv_bias: bool = True, gelu: str = "tanh",
                 norm_eps: float = 1e-6, dropout: float = 0.0, attention_dropout: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, num_heads, qkv_bias, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, mlp_dim, gelu, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = None if self.training else _fused_dtype(x, self.attn.qkv.weight)
        if dtype is not None:
            x = _fused_linear_add(self.attn.attend_fused(self.norm1(x), dtype), self.attn.proj, x, dtype)
            return _fused_linear_add(self.mlp.hidden_fused(self.norm2(x), dtype), self.mlp.fc2, x, dtype)
        cast = None if self.training else _cuda_cast_dtype(x)
        if cast is not None:
            x = x + self.attn.forward_cast(self.norm1(x), cast)
            return x + self.mlp.forward_cast(self.norm2(x), cast)
        x = x + self.drop_path(self.attn(_norm(self.norm1, x)))
        return x + self.drop_path(self.mlp(_norm(self.norm2, x)))

    def forward_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, probs = self.attn.forward_with_probs(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), probs


def init_official_(block: Block) -> None:
    """The official initialisation of one block: Xavier-uniform Dense kernels (q, k and v each on its own
    D x D fan, not the fused 3D), zero attention biases, N(0, 1e-6) MLP biases."""
    qkv = block.attn.qkv
    d = qkv.weight.shape[1]
    bound = math.sqrt(6.0 / (d + d))
    nn.init.uniform_(qkv.weight, -bound, bound)
    if qkv.bias is not None:
        nn.init.zeros_(qkv.bias)
    nn.init.xavier_uniform_(block.attn.proj.weight)
    nn.init.zeros_(block.attn.proj.bias)
    for fc in (block.mlp.fc1, block.mlp.fc2):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.normal_(fc.bias, std=1e-6)
