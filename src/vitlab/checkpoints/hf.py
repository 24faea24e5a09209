"""Hugging Face transformers ViT checkpoints: a directory (or hub repo) with ``config.json`` and
``model.safetensors`` for ``ViTForImageClassification`` or ``ViTModel``, read into vitlab and written back.

The numerics come from ``config.json``: ``hidden_act`` ("gelu" is exact erf GELU, "gelu_pytorch_tanh" /
"gelu_new" the tanh form), ``layer_norm_eps`` (1e-12 by default, not the official 1e-6) and ``qkv_bias``.
HF's pooler (Dense + tanh on the class token) is the paper's pre-logits layer; ``ViTForImageClassification``
does not use it, so its classifier becomes vitlab's head on the class token. ``id2label`` becomes
``model.labels``. Files are read and written in the layout transformers saves (``vit.encoder.layer.N.attention
.attention.query``...); the renamed in-memory names of transformers 5 (``vit.layers.N.attention.q_proj``...) are
accepted too.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vitlab.checkpoints.build import model_from_state_dict, resolve_config
from vitlab.checkpoints.io import read_weights
from vitlab.checkpoints.strict import CheckpointError
from vitlab.io import atomic_write
from vitlab.model.config import ViTConfig
from vitlab.model.vit import VisionTransformer

logger = logging.getLogger(__name__)

GELU_FORMS = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
# Per-layer renames, vitlab suffix -> HF suffix under ``encoder.layer.N.`` (q/k/v are fused separately).
LAYER_TABLE = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
TOP_TABLE = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "pre_logits.weight": "pooler.dense.weight",
    "pre_logits.bias": "pooler.dense.bias",
}
# transformers 5 in-memory names -> the saved layout.
_V5_NAMES = (
    (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", lambda m: f"encoder.layer.{m[1]}.attention.attention."
     f"{dict(q='query', k='key', v='value')[m[2]]}."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", lambda m: f"encoder.layer.{m[1]}.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", lambda m: f"encoder.layer.{m[1]}.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", lambda m: f"encoder.layer.{m[1]}.output.dense."),
    (r"^layers\.(\d+)\.", lambda m: f"encoder.layer.{m[1]}."),
)


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    return config


def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``vit.`` (ViTForImageClassification) and map transformers-5 names onto the saved layout."""
    out = {}
    for key, value in sd.items():
        if key.startswith("vit."):
            key = key[4:]
        for pattern, repl in _V5_NAMES:
            new = re.sub(pattern, repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    return out


def config_from_hf(hf: dict[str, Any], sd: Mapping[str, torch.Tensor], source: str,
                   model: Any = None) -> tuple[ViTConfig, list[str] | None]:
    """The vitlab config and class names described by an HF ``config.json`` and the weights it comes with."""
    if hf.get("model_type") != "vit":
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}, expected 'vit'")
    act = hf.get("hidden_act", "gelu")
    if act not in GELU_FORMS:
        raise CheckpointError(f"{source}: hidden_act={act!r} is not a GELU form vitlab computes ({list(GELU_FORMS)})")
    has_head = "classifier.weight" in sd
    has_pooler = "pooler.dense.weight" in sd
    if has_pooler and hf.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"{source}: pooler_act={hf.get('pooler_act')!r}; the paper's pre-logits use tanh")
    labels = None
    id2label = hf.get("id2label")
    num_classes = sd["classifier.weight"].shape[0] if has_head else 0
    if has_head and isinstance(id2label, dict) and len(id2label) == num_classes:
        # JSON keys are strings; a dict built in Python may use ints.
        labels = [str(id2label[str(i)] if str(i) in id2label else id2label.get(i, i)) for i in range(num_classes)]
    image = hf.get("image_size", 224)
    patch = hf.get("patch_size", 16)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: config.json lacks {missing}")
    derived = dict(
        image_size=tuple(image) if isinstance(image, list) else image,
        patch_size=tuple(patch) if isinstance(patch, list) else patch,
        in_channels=hf.get("num_channels", 3), width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"], num_classes=num_classes,
        representation_size=sd["pooler.dense.weight"].shape[0] if has_pooler else None,
        qkv_bias=hf.get("qkv_bias", True), dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
    )
    numerics = {"gelu": GELU_FORMS[act], "norm_eps": hf.get("layer_norm_eps", 1e-12)}
    return resolve_config(model, derived, {}, numerics, source), labels


def hf_to_vitlab(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """HF ViT weights (saved layout, ``vit.`` prefix optional) -> vitlab state dict (q/k/v fused)."""
    sd = _normalise_keys(sd)
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    for ours, theirs in TOP_TABLE.items():
        if theirs in sd:
            out[ours] = take(theirs)
    for i in range(config.depth):
        layer = f"encoder.layer.{i}."
        att = layer + "attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(att + f"{n}.weight") for n in ("query", "key", "value")])
        if att + "query.bias" in sd:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(att + f"{n}.bias") for n in ("query", "key", "value")])
        for ours, theirs in LAYER_TABLE.items():
            for leaf in ("weight", "bias"):
                if layer + f"{theirs}.{leaf}" in sd:
                    out[f"blocks.{i}.{ours}.{leaf}"] = take(layer + f"{theirs}.{leaf}")
    for leaf in ("weight", "bias"):
        if f"classifier.{leaf}" in sd:
            out[f"head.{leaf}"] = take(f"classifier.{leaf}")
    unexpected = [k for k in sd if k not in used]
    if unexpected:
        raise CheckpointError(f"unexpected HF weights ({len(unexpected)}): {unexpected[:20]}")
    return out


def vitlab_to_hf(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """vitlab state dict -> the layout transformers saves (``vit.`` prefix when there is a classifier)."""
    prefix = "vit." if config.num_classes > 0 else ""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in TOP_TABLE.items():
        if ours in sd:
            out[prefix + theirs] = sd[ours]
    D = config.width
    for i in range(config.depth):
        layer = f"{prefix}encoder.layer.{i}."
        for n, w in zip(("query", "key", "value"), sd[f"blocks.{i}.attn.qkv.weight"].split(D)):
            out[layer + f"attention.attention.{n}.weight"] = w
        if f"blocks.{i}.attn.qkv.bias" in sd:
            for n, b in zip(("query", "key", "value"), sd[f"blocks.{i}.attn.qkv.bias"].split(D)):
                out[layer + f"attention.attention.{n}.bias"] = b
        for ours, theirs in LAYER_TABLE.items():
            for leaf in ("weight", "bias"):
                out[layer + f"{theirs}.{leaf}"] = sd[f"blocks.{i}.{ours}.{leaf}"]
    if config.num_classes > 0:
        out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def hf_config(config: ViTConfig, labels: list[str] | None = None) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild ``config`` exactly."""
    if config.classifier != "token" or config.pos_embed != "learned-1d" or config.backbone is not None:
        raise ValueError("transformers' ViT has a class token, a learned 1D position embedding and no ResNet "
                         f"backbone; this model has classifier={config.classifier!r}, pos_embed="
                         f"{config.pos_embed!r}, backbone={'yes' if config.backbone else 'no'}")
    if config.representation_size is not None and config.num_classes > 0:
        raise ValueError("transformers has no ViT class with both a pooler (pre-logits) and a classifier; load "
                         "with drop_pre_logits=True, or num_classes=0 to export the pre-logits model as ViTModel")
    labels = labels if labels is not None else [f"LABEL_{i}" for i in range(config.num_classes)]
    if len(labels) != config.num_classes and config.num_classes > 0:
        raise ValueError(f"{len(labels)} labels for {config.num_classes} classes")
    size = lambda s: list(s) if isinstance(s, tuple) else s  # noqa: E731
    out: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if config.num_classes > 0 else "ViTModel"],
        "model_type": "vit",
        "hidden_size": config.width, "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim, "image_size": size(config.image_size),
        "patch_size": size(config.patch_size), "num_channels": config.in_channels,
        "hidden_act": "gelu" if config.gelu == "exact" else "gelu_pytorch_tanh",
        "layer_norm_eps": config.norm_eps, "qkv_bias": config.qkv_bias,
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention_dropout,
        "pooler_act": "tanh", "pooler_output_size": config.representation_size or config.width,
        "encoder_stride": config.patch_hw[0],
    }
    if config.num_classes > 0:
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
    return out


def load_hf(source: str | os.PathLike, model: Any = None) -> VisionTransformer:
    """An HF ViT directory as a vitlab model with HF's numerics; ``model.labels`` from ``id2label``."""
    directory = Path(source)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected a directory with config.json and model.safetensors")
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json; not a Hugging Face model directory")
    hf = read_config_json(directory / "config.json")
    weights = next((directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).exists()),
                   None)
    if weights is None:
        raise CheckpointError(f"{directory}: has config.json but no weights (expected model.safetensors or "
                              f"pytorch_model.bin)")
    raw = read_weights(weights)
    sd = _normalise_keys(raw)
    if "classifier.weight" in sd and any(k.startswith("pooler.") for k in sd):
        # ViTForImageClassification never runs the pooler; transformers ignores these weights too.
        logger.info("%s: ignoring pooler weights of a classification checkpoint", weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
    config, labels = config_from_hf(hf, sd, str(directory), model)
    try:
        converted = hf_to_vitlab(sd, config)
    except KeyError as e:
        raise CheckpointError(f"{weights}: missing weight {e} for the config in config.json") from None
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    net = model_from_state_dict(config, converted, str(weights))
    net.labels = labels
    return net


def save_hf(model: VisionTransformer, path: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Write ``path/config.json`` and ``path/model.safetensors`` as transformers saves them."""
    from safetensors.torch import save_file

    config = hf_config(model.config, labels)
    sd = vitlab_to_hf(model.state_dict(), model.config)
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory; an HF checkpoint is a directory")
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    atomic_write(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory
