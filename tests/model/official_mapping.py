"""A small test-only mapping from the official vit_jax parameter layout to vitlab's state dict, so the model can be
checked against the official outputs independently of the checkpoint package."""

from __future__ import annotations

import numpy as np
import torch


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def official_to_state_dict(p: dict[str, np.ndarray], depth: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    conv = lambda k: _t(k.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    hybrid = "conv_root/kernel" in p
    embed = "patch_embed.proj" if not hybrid else "patch_embed.proj"
    sd[f"{embed}.weight"] = conv(p["embedding/kernel"])
    sd[f"{embed}.bias"] = _t(p["embedding/bias"])
    if "cls" in p:
        sd["cls_token"] = _t(p["cls"])
    sd["pos_embed"] = _t(p["Transformer/posembed_input/pos_embedding"])
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        D = p[a + "query/kernel"].shape[0]
        sd[f"blocks.{i}.norm1.weight"] = _t(p[b + "LayerNorm_0/scale"])
        sd[f"blocks.{i}.norm1.bias"] = _t(p[b + "LayerNorm_0/bias"])
        sd[f"blocks.{i}.attn.qkv.weight"] = _t(
            np.concatenate([p[a + f"{n}/kernel"].reshape(D, D).T for n in ("query", "key", "value")])
        )
        sd[f"blocks.{i}.attn.qkv.bias"] = _t(np.concatenate([p[a + f"{n}/bias"].reshape(D) for n in ("query", "key", "value")]))
        sd[f"blocks.{i}.attn.proj.weight"] = _t(p[a + "out/kernel"].reshape(D, D).T)
        sd[f"blocks.{i}.attn.proj.bias"] = _t(p[a + "out/bias"])
        sd[f"blocks.{i}.norm2.weight"] = _t(p[b + "LayerNorm_2/scale"])
        sd[f"blocks.{i}.norm2.bias"] = _t(p[b + "LayerNorm_2/bias"])
        for j in (0, 1):
            sd[f"blocks.{i}.mlp.fc{j + 1}.weight"] = _t(p[b + f"MlpBlock_3/Dense_{j}/kernel"].T)
            sd[f"blocks.{i}.mlp.fc{j + 1}.bias"] = _t(p[b + f"MlpBlock_3/Dense_{j}/bias"])
    sd["norm.weight"] = _t(p["Transformer/encoder_norm/scale"])
    sd["norm.bias"] = _t(p["Transformer/encoder_norm/bias"])
    if "pre_logits/kernel" in p:
        sd["pre_logits.weight"] = _t(p["pre_logits/kernel"].T)
        sd["pre_logits.bias"] = _t(p["pre_logits/bias"])
    sd["head.weight"] = _t(p["head/kernel"].T)
    sd["head.bias"] = _t(p["head/bias"])
    if hybrid:
        bb = "patch_embed.backbone."
        sd[bb + "stem.conv.weight"] = conv(p["conv_root/kernel"])
        sd[bb + "stem.norm.weight"] = _t(p["gn_root/scale"].reshape(-1))
        sd[bb + "stem.norm.bias"] = _t(p["gn_root/bias"].reshape(-1))
        s = 1
        while f"block{s}/unit1/conv1/kernel" in p:
            u = 1
            while f"block{s}/unit{u}/conv1/kernel" in p:
                src, dst = f"block{s}/unit{u}/", f"{bb}stages.{s - 1}.blocks.{u - 1}."
                for n in (1, 2, 3):
                    sd[dst + f"conv{n}.weight"] = conv(p[src + f"conv{n}/kernel"])
                    sd[dst + f"norm{n}.weight"] = _t(p[src + f"gn{n}/scale"].reshape(-1))
                    sd[dst + f"norm{n}.bias"] = _t(p[src + f"gn{n}/bias"].reshape(-1))
                if src + "conv_proj/kernel" in p:
                    sd[dst + "downsample.conv.weight"] = conv(p[src + "conv_proj/kernel"])
                    sd[dst + "downsample.norm.weight"] = _t(p[src + "gn_proj/scale"].reshape(-1))
                    sd[dst + "downsample.norm.bias"] = _t(p[src + "gn_proj/bias"].reshape(-1))
                u += 1
            s += 1
    return sd
