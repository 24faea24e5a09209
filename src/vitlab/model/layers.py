"""The Transformer encoder's layers (paper Sec. 3.1, Eq. 1-4): patch embedding, multi-head self-attention, the
GELU MLP, and the pre-norm residual block that combines them. The arithmetic is the paper's; where a faster path
computes the same function (fused matmuls, C++ kernels), ``vitlab.model.fast`` chooses it by the device's
capability."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.model import fast


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each linearly (a strided convolution)."""

    def __init__(self, patch_size: tuple[int, int], in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # B, D, gh, gw
        return x.flatten(2).transpose(1, 2)  # B, N, D (grid row-major, as the official code)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    ``forward`` never materialises the (B, H, N, N) probabilities (``fast.attention``: SDPA or vitlab's CPU paths);
    ``forward_with_probs`` computes the same function explicitly and also returns them.
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

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # B, N, 3, H, hd

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, N, hd = o.shape
        o = o.transpose(1, 2).reshape(B, N, H * hd)  # B, N, D
        return self.proj_drop(self.proj(o))

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Attention output (B, N, D); with ``queries=n``, only the first n tokens' rows (B, n, D): those tokens
        attend to every token, and the other tokens' queries are never computed."""
        p = self.attention_dropout if self.training else 0.0
        if queries is None:
            return self._out(fast.attention(self._qkv(x), p))
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias  # rows: q, then k, then v
        q = F.linear(x[:, :queries], w[:D], None if b is None else b[:D])  # B, n, D
        kv = F.linear(x, w[D:], None if b is None else b[D:])  # B, N, 2D
        k, v = kv.reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # B, H, N, hd
        o = F.scaled_dot_product_attention(q.reshape(B, queries, H, hd).transpose(1, 2), k, v, dropout_p=p)
        return self._out(o)

    def forward_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = fast.split_heads(self._qkv(x))
        logits = (q * self.scale) @ k.transpose(-2, -1)  # B, H, N, N
        probs = logits.softmax(dim=-1)
        dropped = F.dropout(probs, self.attention_dropout, self.training)
        return self._out(dropped @ v), probs


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
        return self.drop2(self.fc2(self.drop1(fast.gelu(self.fc1(x), self.act))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample, scaling survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """This call's per-sample factors for ``x``, (B, 1, ...): 0 or 1/(1-p); None when nothing is dropped (p = 0
        or eval). The fused training path (``fast.block_train``) draws its factors here too, so both paths drop the
        same samples from the same seed."""
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale(x)
        return x if scale is None else x * scale  # scale the (B, 1, ...) factors, not the activations

    def extra_repr(self) -> str:
        return f"p={self.p}"


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

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The block's output (B, N, D); with ``queries=n``, the first n tokens' outputs only (B, n, D), the same
        values: a token's output depends on the others only through attention's keys and values. The classifier
        reads only the class token of the last block, so ``VisionTransformer.forward`` skips the rest there."""
        # The same function in fewer passes, by the device's capability; None where none applies.
        y = fast.block_train(self, x, queries) if self.training else fast.block_inference(self, x, queries)
        if y is not None:
            return y
        rows = x if queries is None else x[:, :queries]
        x = rows + self.drop_path(self.attn(fast.layer_norm(self.norm1, x), queries))
        return x + self.drop_path(self.mlp(fast.layer_norm(self.norm2, x)))

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
