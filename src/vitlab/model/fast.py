"""The speed paths of the encoder's layers, apart from the paper's arithmetic in ``layers.py``: each computes the
same function as the plain PyTorch ops (the tests compare every path against ``use("plain")``), chosen here by one
capability check (``cpu_path``), from ``vitlab.precision``'s reading of the CPU.

CPU paths:
- ``avx512-bf16`` (AVX512-BF16/AMX CPUs, where ``auto`` precision is bf16): inference Dense layers as oneDNN
  matmuls with bias, GELU and residual add fused into the epilogue and bf16 weights prepacked once; C++ kernels
  (``cpu_kernels``) for bf16 attention (``vdpbf16ps`` matmuls, fp32 logits, fused softmax, forward and backward),
  the tanh GELU and LayerNorm with a bf16 result under autocast.
- ``avx2`` (every other x86-64 CPU with AVX2 and FMA, where ``auto`` is fp32): fp32 inference on MKL's matmuls
  (faster than oneDNN's fp32 kernels there) with the residual accumulated into the matmul's output and the bias and
  GELU in one C++ pass; in training, attention for short sequences in C++ (SDPA's CPU backward runs far below the
  matmul rate), its probabilities kept for the backward, and each Dense layer's bias joined to what follows it
  (GELU; drop-path and the residual add) in one C++ pass forward and backward (``block_train``).
- ``plain``: PyTorch ops (other CPUs, e.g. ARM, or with ``VITLAB_CPU_KERNELS=0`` for the C++ parts).
A GPU always runs the plain ops, except that autocast inference reuses Dense weights cast once.
torch.compile and torch.export tracing always see the plain ops.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vitlab import precision
from vitlab.model import cpu_kernels

PATHS = ("avx512-bf16", "avx2", "plain")
_forced: list[str] = []


@functools.cache
def _detected_cpu_path() -> str:
    if precision.cpu_native_bf16() and _onednn_ops_available():
        return "avx512-bf16"
    if precision.cpu_capability() in ("AVX2", "AVX512"):
        return "avx2"
    return "plain"


def cpu_path() -> str:
    """The CPU path this process takes: one of ``PATHS`` (``use`` overrides it)."""
    return _forced[-1] if _forced else _detected_cpu_path()


def available(path: str) -> bool:
    """Whether this CPU can take ``path``: every path below the detected one can (``plain`` everywhere)."""
    return PATHS.index(path) >= PATHS.index(_detected_cpu_path())


@contextlib.contextmanager
def use(path: str) -> Iterator[None]:
    """Take ``path`` inside a ``with`` block: ``"plain"`` to compute with PyTorch's ops only (e.g. to count FLOPs
    with ``FlopCounterMode``, which knows no fused op, or as the reference in tests); another path only where this
    CPU can run it."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if not available(path):
        raise ValueError(f"this CPU cannot take the {path} path (torch CPU capability "
                         f"{precision.cpu_capability()}, native bf16: {precision.cpu_native_bf16()})")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()


def _onednn_ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: they must see ordinary ops."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _cpu_eager(x: torch.Tensor, path: str) -> bool:
    return x.device.type == "cpu" and cpu_path() == path and not tracing()


def kernels(x: torch.Tensor):
    """The C++ kernel module for this CPU path if ``x`` is on the CPU and not traced, else None."""
    if x.device.type != "cpu" or tracing():
        return None
    path = cpu_path()
    if path == "avx512-bf16":
        return cpu_kernels.kernels()
    if path == "avx2":
        return cpu_kernels.fp32_kernels()
    return None


# ------------------------------------------------------------------------------------------------ attention
def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, each (B, H, N, hd), as views of the qkv projection's output (B, N, 3, H, hd)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


SHORT_SEQUENCE = 256  # vitlab's attention measured faster than SDPA's at 64 and 197 tokens (docs/speed.md)
FORWARD_ELEMENTS = 2**18  # probabilities per forward slice: 1 MB in fp32, in cache (docs/speed.md point 2)
BACKWARD_ELEMENTS = 2**18  # per backward slice; whole-batch temporaries raised the training peak memory 8%


def _bf16_attention_kernel(q: torch.Tensor):
    """The C++ bf16 attention kernel where it applies (bf16, hd a multiple of 16, rows readable as bf16 pairs)."""
    if q.dtype != torch.bfloat16 or q.shape[-1] % 16 or cpu_path() != "avx512-bf16":
        return None
    if q.stride(-1) != 1 or any(st % 2 for st in q.stride()[:-1]) or q.storage_offset() % 2:
        return None
    return kernels(q)


def _sliced_applies(t: torch.Tensor, tokens: int) -> bool:
    """Whether vitlab's attention beats SDPA's CPU kernel: bf16/fp16 on the avx512-bf16 path, short sequences.
    (In fp32, SDPA's fused kernel is as fast as the sliced matmuls, forward and backward.)"""
    return (t.device.type == "cpu" and tokens <= SHORT_SEQUENCE and t.dtype in (torch.bfloat16, torch.float16)
            and cpu_path() == "avx512-bf16")


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for (B, H, N, hd) CPU inputs as batched matmuls over slices of the batch:
    logits and softmax in fp32 (the precision of SDPA's fused kernel), probabilities rounded once for the matmul
    with ``v``. Slices of at most ``FORWARD_ELEMENTS`` probabilities keep the (N, N) temporaries in cache."""
    B, H, N, hd = q.shape
    scale = hd**-0.5
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    step = max(1, FORWARD_ELEMENTS // (H * N * N))
    dense = torch.contiguous_format  # q, k, v are strided views of one qkv tensor; the matmuls want them dense
    for start in range(0, B, step):
        s = slice(start, start + step)
        qs, ks = (t[s].to(acc, memory_format=dense) for t in (q, k))
        logits = torch.matmul(qs, ks.transpose(-2, -1)).mul_(scale)  # b, H, N, N
        torch.matmul(torch.softmax(logits, dim=-1).to(q.dtype), v[s].contiguous(), out=out[s])
    return out


def _short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    kernel = _bf16_attention_kernel(q)
    if kernel is None:
        return sliced_attention(q, k, v)
    return kernel.attention_forward(q, k, v, q.shape[-1] ** -0.5)  # (B, H, N, hd) view of (B, N, H, hd)


class SlicedAttention(torch.autograd.Function):
    """Softmax attention of the qkv projection's output (B, N, 3, H, hd) -> (B, H, N, hd), whose backward
    recomputes the probabilities, in fp32 where it matters (logits, softmax, their gradient): in the C++ kernel
    for bf16 on the avx512-bf16 path, else with batched matmuls over slices of the batch. Taking qkv whole lets
    the backward return one gradient in qkv's own layout (separate dq, dk, dv would be stacked by autograd).
    It saves only qkv, less than SDPA's fused kernel (qkv, output and log-sum-exp)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qkv)
        return _short_attention(*split_heads(qkv))

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> torch.Tensor:
        (qkv,) = ctx.saved_tensors
        q, k, v = split_heads(qkv)
        B, H, N, hd = q.shape
        dt, scale = q.dtype, hd**-0.5
        kernel = _bf16_attention_kernel(q)
        if kernel is not None:
            return kernel.attention_backward(q, k, v, do if do.stride(-1) == 1 else do.contiguous(), scale)
        acc = torch.promote_types(dt, torch.float32)
        dqkv = torch.empty(qkv.shape, dtype=dt, device=qkv.device)
        dq, dk, dv = split_heads(dqkv)
        step = max(1, BACKWARD_ELEMENTS // (H * N * N))
        for start in range(0, B, step):
            s = slice(start, start + step)
            # The logits in fp32: rounding them to bf16 would perturb the probabilities by ~|logit| * 2^-8.
            p = torch.softmax(torch.matmul(q[s].to(acc), k[s].to(acc).transpose(-2, -1)).mul_(scale), dim=-1)
            dv[s] = torch.matmul(p.to(dt).transpose(-2, -1), do[s])  # b, H, N, hd
            dp = torch.matmul(do[s], v[s].transpose(-2, -1)).to(acc)  # b, H, N, N
            # Softmax backward: ds = p * (dp - sum_j p_ij dp_ij), in fp32, cast once for the matmuls.
            pdp = p * dp
            ds = pdp.sub_(p.mul_(pdp.sum(dim=-1, keepdim=True))).mul_(scale).to(dt)
            dq[s] = torch.matmul(ds, k[s])
            dk[s] = torch.matmul(ds.transpose(-2, -1), q[s])
        return dqkv


class Fp32Attention(torch.autograd.Function):
    """Softmax attention of fp32 qkv (B, N, 3, H, hd) -> (B, H, N, hd) in the avx2 build's C++ kernel, forward and
    backward, one (sample, head) at a time in cache. The forward keeps the probabilities for the backward (it used
    to recompute them from qkv: a third of the backward's time at the CIFAR model's shapes, for 8 MB a block there);
    the backward returns the gradient in qkv's layout."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, kernel) -> torch.Tensor:
        ctx.kernel = kernel
        out, probs = kernel.attention_forward_probs(qkv, qkv.shape[-1] ** -0.5)
        ctx.save_for_backward(qkv, probs)
        return out.transpose(1, 2)  # B, H, N, hd view

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, probs = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        return ctx.kernel.attention_backward(qkv, do, qkv.shape[-1] ** -0.5, probs), None


FP32_SHORT_SEQUENCE = 128  # faster than SDPA at 64 tokens, slower at 197 (docs/speed.md, "Two CPU classes")


def _fp32_attention_kernel(qkv: torch.Tensor):
    """The avx2 build's fp32 attention where it beats SDPA: training (its forward alone only equals SDPA's), fp32
    on the CPU, head dim a multiple of 8, a dense last dimension, at most ``FP32_SHORT_SEQUENCE`` tokens."""
    if qkv.dtype != torch.float32 or qkv.shape[-1] % 8 or qkv.stride(-1) != 1 \
            or qkv.shape[1] > FP32_SHORT_SEQUENCE or not (torch.is_grad_enabled() and qkv.requires_grad) \
            or cpu_path() != "avx2":
        return None
    return kernels(qkv)


def attention(qkv: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v of the qkv projection's output (B, N, 3, H, hd), as (B, H, N, hd); dropout on
    the probabilities (training) always takes SDPA."""
    kernel = _fp32_attention_kernel(qkv) if dropout == 0.0 else None
    if kernel is not None and not torch.compiler.is_exporting():
        return Fp32Attention.apply(qkv, kernel)
    if dropout == 0.0 and _sliced_applies(qkv, qkv.shape[1]):
        if torch.is_grad_enabled() and qkv.requires_grad:
            # torch.compile traces the Function too (faster than SDPA's backward there as well, docs/speed.md);
            # export keeps the standard op.
            if not torch.compiler.is_exporting():
                return SlicedAttention.apply(qkv)
        elif not tracing():
            return _short_attention(*split_heads(qkv))
    return F.scaled_dot_product_attention(*split_heads(qkv), dropout_p=dropout)


# ----------------------------------------------------------------------------------------- GELU and LayerNorm
class _KernelGelu(torch.autograd.Function):
    """GELU through the C++ kernels (one pass each way; PyTorch's CPU tanh GELU runs at a third of the speed of
    its erf GELU). Saves its input, as PyTorch's GELU does."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, kernel) -> torch.Tensor:
        ctx.kernel = kernel
        ctx.save_for_backward(h)
        return kernel.gelu_tanh_forward(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (h,) = ctx.saved_tensors
        return ctx.kernel.gelu_tanh_backward(grad.contiguous(), h), None


def gelu(h: torch.Tensor, act: nn.GELU) -> torch.Tensor:
    """``act(h)``; the tanh form through the C++ kernel where this path has one for ``h`` (the avx512-bf16 build
    for bf16 and fp32, the avx2 build for fp32)."""
    dtypes = (torch.bfloat16, torch.float32) if cpu_path() == "avx512-bf16" else (torch.float32,)
    kernel = kernels(h) if act.approximate == "tanh" and h.dtype in dtypes and h.is_contiguous() else None
    if kernel is None:
        return act(h)
    return _KernelGelu.apply(h, kernel)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; under CPU bf16 autocast on the avx512-bf16 path, as one pass that writes the bf16 the next
    Dense layer reads (``_LayerNormBf16``) instead of autocast's fp32 LayerNorm followed by a cast."""
    if (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu") and _cpu_eager(x, "avx512-bf16")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.is_contiguous() and norm.weight is not None
            and norm.bias is not None and norm.weight.dtype == torch.float32):
        kernel = kernels(x)
        if kernel is not None:
            return _LayerNormBf16.apply(x, norm.weight, norm.bias, norm.eps, kernel)
    return norm(x)


class _LayerNormBf16(torch.autograd.Function):
    """LayerNorm of fp32 ``x`` with a bf16 result: what autocast computes (LayerNorm in fp32, rounded to bf16 for
    the Dense layer that reads it) without autocast's cast pass forward and the cast of the gradient back.
    Saves what PyTorch's LayerNorm saves (x, mean, 1/std)."""

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


# ------------------------------------------------------------------------------------------ training blocks
def block_train(block: nn.Module, x: torch.Tensor, queries: int | None = None) -> torch.Tensor | None:
    """One encoder block in training with autograd, on the avx2 path: the same function as the plain forward with
    each Dense layer's bias joined to what follows it (GELU after fc1; drop-path and the residual add after proj
    and fc2) in one C++ pass, forward and backward (``_BiasGelu``, ``_BiasResidual``). None where the plain forward
    runs: another path, device or dtype, autocast, tracing, dropout, or ``queries``."""
    if not (torch.is_grad_enabled() and _cpu_eager(x, "avx2") and x.dtype == torch.float32 and queries is None
            and not torch.is_autocast_enabled("cpu") and x.is_contiguous() and x.dim() == 3):
        return None
    attn, mlp = block.attn, block.mlp
    if attn.attention_dropout or attn.proj_drop.p or mlp.drop1.p or mlp.drop2.p:
        return None
    # The C++ passes take whole 8-float vectors per row: the width (proj's and fc1's inputs) and the MLP width
    # (fc2's input).
    if any(t.dtype != torch.float32 or t.shape[-1] % 8 for t in (attn.proj.weight, mlp.fc1.weight, mlp.fc2.weight)):
        return None
    kernel = kernels(x)
    if kernel is None:
        return None
    B, N, D = x.shape
    o = attention(attn._qkv(layer_norm(block.norm1, x)))  # B, H, N, hd
    y = F.linear(o.transpose(1, 2).reshape(B, N, D), attn.proj.weight)
    x = _BiasResidual.apply(x, y, attn.proj.bias, _drop_path_scale(block.drop_path, x), kernel)
    z = F.linear(layer_norm(block.norm2, x), mlp.fc1.weight)
    h = _BiasGelu.apply(z, mlp.fc1.bias, mlp.act.approximate, kernel)
    y = F.linear(h, mlp.fc2.weight)
    return _BiasResidual.apply(x, y, mlp.fc2.bias, _drop_path_scale(block.drop_path, x), kernel)


def _drop_path_scale(drop_path: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``DropPath.scale`` as the (B,) tensor the C++ pass reads; None without drop-path."""
    scale = drop_path.scale(x)
    return None if scale is None else scale.view(-1)


class _BiasGelu(torch.autograd.Function):
    """GELU(z + bias) for fc1's bias-free matmul output z, in one pass; the backward computes dz and the bias
    gradient in one pass too (saves z, as nn.Linear + GELU saves its output)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, bias: torch.Tensor, approximate: str, kernel) -> torch.Tensor:
        ctx.kernel, ctx.approximate = kernel, approximate
        ctx.save_for_backward(z, bias)
        return kernel.bias_gelu_forward(z, bias, approximate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        z, bias = ctx.saved_tensors
        dz, dbias = ctx.kernel.bias_gelu_backward(grad.contiguous(), z, bias, ctx.approximate)
        return dz, dbias, None, None


class _BiasResidual(torch.autograd.Function):
    """x + scale[b] (y + bias): a Dense branch's bias, drop-path scale (None: 1) and residual add in one pass;
    the backward hands the gradient to x unchanged and computes y's (scaled) and the bias's in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                kernel) -> torch.Tensor:
        ctx.kernel, ctx.scale = kernel, scale
        return kernel.bias_residual_forward(x, y, bias, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        grad = grad.contiguous()
        dy, dbias = ctx.kernel.bias_residual_backward(grad, ctx.scale)
        return grad, dy, dbias, None, None


# ------------------------------------------------------------------------------------------ inference blocks
def block_inference(block: nn.Module, x: torch.Tensor, queries: int | None = None) -> torch.Tensor | None:
    """One encoder block without autograd through the fastest path for ``x``'s device and dtype, or None where
    only the plain forward applies (training, autograd, tracing, another device or dtype). ``queries=n``: the
    first n tokens' outputs only (``Block.forward``); the avx2 path leaves that to the plain ops, whose fp32 k/v
    projection needs no cached weights."""
    if torch.is_grad_enabled() or tracing():
        return None
    if x.device.type == "cpu":
        path = cpu_path()
        if path == "avx512-bf16":
            dtype = _onednn_dtype(x, block.attn.qkv.weight)
            return None if dtype is None else _block_onednn(block, x, dtype, queries)
        if path == "avx2" and x.dtype == torch.float32 and block.attn.qkv.weight.dtype == torch.float32 \
                and not torch.is_autocast_enabled("cpu") and queries is None:
            return _block_mkl_fp32(block, x)
        return None
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and _forced[-1:] != ["plain"]:
        return _block_cast(block, x, torch.get_autocast_dtype("cuda"), queries)
    return None


def _onednn_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused oneDNN path computes in for input ``x``, or None when the plain ops must run."""
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


def _attend(block: nn.Module, x: torch.Tensor, qkv: torch.Tensor, queries: int | None = None) -> torch.Tensor:
    """Inference attention of qkv (B, N, 3H*hd) up to, not including, the output projection: (B, N, D), or
    (B, n, D) for the first ``queries=n`` tokens' queries against every key."""
    B, N, D = x.shape
    qkv = qkv.reshape(B, N, 3, block.attn.num_heads, block.attn.head_dim)
    if queries is None:
        return attention(qkv).transpose(1, 2).reshape(B, N, D)  # from B, H, N, hd
    q, k, v = split_heads(qkv)
    return F.scaled_dot_product_attention(q[:, :, :queries], k, v).transpose(1, 2).reshape(B, queries, D)


def _rows(x: torch.Tensor, queries: int | None) -> torch.Tensor:
    """The residual stream of the tokens a block computes: all, or the first ``queries`` (dense)."""
    return x if queries is None else x[:, :queries].contiguous()


def _block_onednn(block: nn.Module, x: torch.Tensor, dtype: torch.dtype, queries: int | None = None
                  ) -> torch.Tensor:
    """Dense layers as oneDNN matmuls with bias, GELU (MLP) and the residual add (output projections) fused.
    With ``queries``, the qkv matmul still runs on every token (one prepacked weight, no per-call slicing and
    casting), everything after attention on the first ``queries`` tokens only."""
    attn, mlp = block.attn, block.mlp
    o = _attend(block, x, _onednn_linear(block.norm1(x), attn.qkv, dtype), queries)
    x = _onednn_linear_add(o, attn.proj, _rows(x, queries), dtype)
    h = _onednn_linear(block.norm2(x), mlp.fc1, dtype, "gelu", mlp.act.approximate)
    return _onednn_linear_add(h, mlp.fc2, x, dtype)


def _onednn_linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype, post: str = "none",
                   algorithm: str = "") -> torch.Tensor:
    """``post(linear(x))`` as one oneDNN call; ``post`` is "none" or "gelu" (``algorithm`` "none" = erf, "tanh")."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # M, K
    w, b = _weights_as(linear, dtype)
    out = torch.ops.mkldnn._linear_pointwise(x2, w, b, post, [], algorithm)  # M, N
    return out.reshape(*lead, out.shape[-1])


def _onednn_linear_add(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor, dtype: torch.dtype
                       ) -> torch.Tensor:
    """``residual + linear(x)``, the addition fused into the matmul when the residual has the compute dtype
    (outside autocast); under autocast the residual stream is fp32 and is added after, as autocast would."""
    if residual.dtype != dtype or linear.weight.dtype != dtype:
        return residual + _onednn_linear(x, linear, dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # M, K
    r2 = residual.reshape(-1, residual.shape[-1])  # M, N
    w, b = _weights_as(linear, dtype)
    out = torch.ops.mkldnn._linear_pointwise.binary(x2, r2, w, b, "add")
    return out.reshape(*lead, out.shape[-1])


def _block_mkl_fp32(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 inference on MKL's matmuls (faster than oneDNN's fp32 matmuls on AVX2 CPUs) with fewer passes over the
    activations than ``nn.Linear`` takes: the output projections accumulate into a copy of the residual stream
    (``addmm_`` with beta 1, no separate add), and fc1 runs without its bias so that bias and GELU are one pass of
    the C++ kernel (``nn.Linear`` first copies the bias into every output row, then GELU reads and writes it
    again)."""
    attn, mlp = block.attn, block.mlp
    B, N, D = x.shape
    kernel = kernels(x)
    qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)  # B, N, 3D
    o = _attend(block, x, qkv)  # B, N, D
    x = _residual_addmm(x, o.reshape(B * N, D), attn.proj)
    h = block.norm2(x).view(B * N, D)
    if kernel is not None:
        a = kernel.bias_gelu_(torch.mm(h, mlp.fc1.weight.t()), mlp.fc1.bias, mlp.act.approximate)  # B*N, M
    else:
        a = mlp.act(F.linear(h, mlp.fc1.weight, mlp.fc1.bias))
    return _residual_addmm(x, a, mlp.fc2)


def _residual_addmm(x: torch.Tensor, h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x + linear(h) for x (B, N, D), h (B*N, K): the bias added into a new dense stream, then the matmul
    accumulated into it (beta 1)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # B, N, D, dense whatever x's strides
    if linear.bias is not None:
        torch.add(x, linear.bias, out=out)
    else:
        out.copy_(x)
    out.view(-1, out.shape[-1]).addmm_(h, linear.weight.t())
    return out


def _block_cast(block: nn.Module, x: torch.Tensor, dtype: torch.dtype, queries: int | None = None
                ) -> torch.Tensor:
    """CUDA autocast inference with the Dense weights cast once (``_weights_as``): autocast casts every weight and
    bias again on each forward, two extra kernels per layer, which at batch 1 (launch-bound) cost ViT-S/16 more
    than timm's whole latency gap. The layers compute bit for bit what autocast computes. ``queries`` as in
    ``_block_onednn``."""
    attn, mlp = block.attn, block.mlp
    o = _attend(block, x, _cast_linear(block.norm1(x), attn.qkv, dtype), queries)
    x = _rows(x, queries) + _cast_linear(o, attn.proj, dtype)
    return x + _cast_linear(mlp.act(_cast_linear(block.norm2(x), mlp.fc1, dtype)), mlp.fc2, dtype)


def _cast_linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    return F.linear(x, *_weights_as(linear, dtype))


# Optimiser steps seen so far, by any torch.optim optimiser: part of the cast cache's key, because torch's fused
# optimisers (``fused=True``, as vitlab's training uses) update parameters in place without bumping their version
# counters, which would otherwise leave a stale low-precision copy in use. The hook is registered with the first
# cached cast, not at import.
_optimizer_steps = 0
_hook: list = []


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _weights_as(linear: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias for a ``dtype`` matmul. Low-precision copies are kept on the layer (on the CPU
    prepacked in oneDNN's blocked layout, so the matmul does not reorder them on every call) until the parameters
    change (version counter, storage or an optimiser step): under autocast this saves the cast autocast repeats on
    every call (for ViT-B/16 it reads 344 MB and writes 172 MB per forward)."""
    w, b = linear.weight, linear.bias
    if dtype == torch.float32 or (w.dtype == dtype and w.device.type != "cpu"):
        return w, b  # fp32: oneDNN's fp32 matmul takes the plain layout at no cost; a GPU needs no packing
    if not _hook:  # (torch.optim deletes its submodule names: ``torch.optim.optimizer`` is not an attribute)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook.append(register_optimizer_step_post_hook(_count_optimizer_step))
    key = (dtype, _optimizer_steps, w._version, w.data_ptr(), None if b is None else (b._version, b.data_ptr()))
    cache = linear.__dict__.setdefault("_vitlab_cast", _CastCache())
    if cache.key != key:
        cast = w.detach().to(dtype)
        if w.device.type == "cpu":
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
