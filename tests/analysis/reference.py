"""Independent NumPy references for the analysis tests: a float64 forward pass of a (non-hybrid, learned-1d)
ViT that returns its attention probabilities, written from the paper's equations rather than vitlab's layers."""

from __future__ import annotations

import math

import numpy as np
import torch


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def attention_probs(model: torch.nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    """Per layer (B, H, T, T) softmax attention of ``model`` on ``images``, in float64 NumPy."""
    cfg = model.config
    assert cfg.pos_embed == "learned-1d" and cfg.backbone is None and cfg.gelu == "tanh"
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    x = images.double().numpy()
    B = x.shape[0]
    ph, pw = cfg.patch_hw
    gh, gw = cfg.grid_size
    # Patches flattened in (C, ph, pw) order, matching a Conv2d weight (D, C, ph, pw).
    patches = x.reshape(B, 3, gh, ph, gw, pw).transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)
    w = sd["patch_embed.proj.weight"].reshape(cfg.width, -1)
    h = patches @ w.T + sd["patch_embed.proj.bias"]
    if cfg.classifier == "token":
        h = np.concatenate([np.repeat(sd["cls_token"], B, 0), h], axis=1)
    h = h + sd["pos_embed"]
    H, hd = cfg.num_heads, cfg.width // cfg.num_heads
    out = []
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = _ln(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.norm_eps)
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        q, k, v = (t.reshape(B, -1, H, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        logits -= logits.max(-1, keepdims=True)
        a = np.exp(logits)
        a /= a.sum(-1, keepdims=True)
        out.append(a)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, -1, cfg.width)
        h = h + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = _ln(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], cfg.norm_eps)
        y = _gelu_tanh(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return out


def random_model(**overrides) -> torch.nn.Module:
    """A tiny ViT whose every parameter is perturbed away from the official init (zero class token, zero biases),
    so the attention is non-trivial and differs between heads, layers and tokens."""
    from vitlab import VisionTransformer, ViTConfig

    cfg = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)
    cfg.update(overrides)
    model = VisionTransformer(ViTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model
