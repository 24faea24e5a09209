"""The official Google checkpoints: ``.npz`` files of the vit_jax repository (``ViT-B_16.npz``, the AugReg files,
the hybrid ``R50+ViT-B_16.npz``) and of big_vision, read into vitlab and written back.

The vit_jax layout (flax parameter paths joined by ``/``) is vitlab's reference; big_vision files are first renamed
onto it (``MultiHeadDotProductAttention_0`` -> ``_1``, ``LayerNorm_1`` -> ``LayerNorm_2``, ``MlpBlock_0`` ->
``MlpBlock_3``, a top-level ``pos_embedding`` without class slot -> ``Transformer/posembed_input`` with a zero
class slot, since big_vision adds the class token after the position embedding), then one pair of pure functions
maps parameters: :func:`official_to_vitlab` and :func:`vitlab_to_official`.

The architecture comes from the shapes where they tell it unambiguously (width, depth, MLP size, heads from the
(D, heads, head_dim) query kernel, patch size, classes, classifier, pre-logits, hybrid stages, and a square grid);
otherwise the caller passes ``model=``. Loaded models use the official numerics: tanh GELU, LayerNorm eps 1e-6,
weight standardisation (w - mean) / (std + 1e-5) and GroupNorm eps 1e-6 in the hybrid's ResNet.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from vitlab.checkpoints.build import count_stage_units, model_from_state_dict, resolve_config
from vitlab.checkpoints.io import report_read
from vitlab.checkpoints.strict import CheckpointError
from vitlab.io import atomic_write
from vitlab.model.config import ResNetConfig, ViTConfig
from vitlab.model.vit import VisionTransformer

logger = logging.getLogger(__name__)

ENC = "Transformer/encoderblock_{}/"
ATT = ENC + "MultiHeadDotProductAttention_1/"
POSEMB = "Transformer/posembed_input/pos_embedding"
# Per-block renames that are pure transposes or copies: vitlab suffix -> (official suffix, "dense" | "vector").
BLOCK_TABLE: dict[str, tuple[str, str]] = {
    "norm1.weight": ("LayerNorm_0/scale", "vector"),
    "norm1.bias": ("LayerNorm_0/bias", "vector"),
    "norm2.weight": ("LayerNorm_2/scale", "vector"),
    "norm2.bias": ("LayerNorm_2/bias", "vector"),
    "mlp.fc1.weight": ("MlpBlock_3/Dense_0/kernel", "dense"),
    "mlp.fc1.bias": ("MlpBlock_3/Dense_0/bias", "vector"),
    "mlp.fc2.weight": ("MlpBlock_3/Dense_1/kernel", "dense"),
    "mlp.fc2.bias": ("MlpBlock_3/Dense_1/bias", "vector"),
}
TOP_TABLE: dict[str, tuple[str, str]] = {
    "norm.weight": ("Transformer/encoder_norm/scale", "vector"),
    "norm.bias": ("Transformer/encoder_norm/bias", "vector"),
    "pre_logits.weight": ("pre_logits/kernel", "dense"),
    "pre_logits.bias": ("pre_logits/bias", "vector"),
    "head.weight": ("head/kernel", "dense"),
    "head.bias": ("head/bias", "vector"),
}
# big_vision names -> vit_jax names (inside each encoder block).
_BIG_VISION_RENAMES = (("MultiHeadDotProductAttention_0/", "MultiHeadDotProductAttention_1/"),
                       ("LayerNorm_1/", "LayerNorm_2/"), ("MlpBlock_0/", "MlpBlock_3/"))
BACKBONE = "patch_embed.backbone."


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _conv_to_torch(k: np.ndarray) -> torch.Tensor:
    return _t(k.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _conv_to_official(w: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(w.numpy().transpose(2, 3, 1, 0))  # OIHW -> HWIO


# ------------------------------------------------------------------------------------------------ reading
class OfficialParams(Mapping[str, np.ndarray]):
    """A lazy, read-only view of an official ``.npz`` under vit_jax key names.

    Arrays are read from the file on access, so converting a large checkpoint never holds the whole file in
    memory twice. Handles the ``params/`` and ``opt/target/`` nestings and big_vision's names, scanned
    (stacked) encoder and class-slot-free position embedding.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._npz = _open_npz(self.path)
        raw = list(self._npz.files)
        # Training checkpoints nest the parameters (and store optimizer state beside them): keep the parameters.
        prefix = next((p for p in ("opt/target/", "params/") if any(k.startswith(p) for k in raw)), "")
        raw = [k for k in raw if k.startswith(prefix)]
        self._src: dict[str, tuple[str, int | None]] = {}  # vit_jax key -> (file key, layer index if scanned)
        self._stacked: dict[str, np.ndarray] = {}
        self.big_vision = any(k[len(prefix):] == "pos_embedding" or "MultiHeadDotProductAttention_0/" in k
                              or k[len(prefix):].startswith("Transformer/encoderblock/") for k in raw)
        for key in raw:
            name = key[len(prefix):]
            if self.big_vision:
                for old, new in _BIG_VISION_RENAMES:
                    name = name.replace(old, new)
                if name.startswith("Transformer/encoderblock/"):
                    depth = self._header_shape(key)[0]  # scanned layers: a leading depth axis
                    for i in range(depth):
                        self._src[name.replace("encoderblock/", f"encoderblock_{i}/")] = (key, i)
                    continue
                if name == "pos_embedding":
                    name = POSEMB
            self._src[name] = (key, None)

    def _read(self, key: str) -> np.ndarray:
        try:
            arr = self._npz[key]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"{self.path}: cannot read array {key!r} ({e}); the file is damaged") from None
        report_read(arr.nbytes)
        return arr

    def __getitem__(self, name: str) -> np.ndarray:
        key, layer = self._src[name]
        if layer is None:
            arr = self._read(key)
        else:
            # Scanned encoders are read layer by layer: keep each stacked array once rather than re-read it.
            if key not in self._stacked:
                self._stacked[key] = self._read(key)
            arr = self._stacked[key][layer]
        if name == POSEMB and self.big_vision and "cls" in self._src:
            # big_vision adds the class token after the position embedding: the class slot is zero.
            arr = np.concatenate([np.zeros_like(arr[:, :1]), arr], axis=1)
        return arr

    def _header_shape(self, key: str) -> tuple[int, ...]:
        try:
            with self._npz.zip.open(key + ".npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                return tuple(read(f)[0])  # (shape, fortran_order, dtype)
        except (KeyError, zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"{self.path}: cannot read the header of {key!r} ({e}); the file is "
                                  f"damaged") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """An array's shape from its .npy header alone (config inference must not read whole kernels)."""
        key, layer = self._src[name]
        shape = self._header_shape(key)
        shape = shape[1:] if layer is not None else shape
        if name == POSEMB and self.big_vision and "cls" in self._src:
            shape = (shape[0], shape[1] + 1, *shape[2:])
        return shape

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the array
        return name in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)

    def close(self) -> None:
        self._stacked.clear()
        self._npz.close()


def _open_npz(path: Path):  # -> np.lib.npyio.NpzFile
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(6)
    # numpy reads a zip archive (.npz) or an .npy header; anything else it would take for a pickle.
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path}: holds pickled data, not an .npz of arrays; vitlab never unpickles "
                              f"checkpoints")
    if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":
        raise CheckpointError(f"{path}: not an .npz file (no zip archive header); damaged, or another format")
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file, truncated or damaged ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds a single array, expected an .npz archive of named parameters")
    return npz


def _depth(p: Mapping[str, np.ndarray]) -> int:
    depth = 0
    while ENC.format(depth) + "LayerNorm_0/scale" in p:
        depth += 1
    return depth


def infer_config(p: OfficialParams, model: str | ViTConfig | dict | None = None) -> ViTConfig:
    """The config of an official checkpoint: read from shapes, from ``model`` where shapes cannot tell."""
    need = ("embedding/kernel", "Transformer/encoder_norm/scale", ATT.format(0) + "query/kernel")
    missing = [k for k in need if k not in p]
    if missing:
        found = ", ".join(list(p)[:8]) or "no arrays"
        raise CheckpointError(f"{p.path}: not a ViT checkpoint: lacks {missing} (found: {found})")
    if any(k.startswith("MAPHead") for k in p):
        raise CheckpointError(f"{p.path}: uses big_vision's MAP head (attention pooling), which is not the paper's "
                              f"classifier; vitlab supports the 'token' and 'gap' classifiers")
    if isinstance(model, ViTConfig):
        return model
    kh, kw, cin, width = p.shape("embedding/kernel")
    _, heads, _ = p.shape(ATT.format(0) + "query/kernel")
    fields: dict = dict(
        in_channels=cin, width=width, depth=_depth(p), num_heads=heads,
        mlp_dim=p.shape(ENC.format(0) + "MlpBlock_3/Dense_0/kernel")[1], patch_size=kh if kh == kw else (kh, kw),
        num_classes=p.shape("head/kernel")[1] if "head/kernel" in p else 0,
        classifier="token" if "cls" in p else "gap",
        representation_size=p.shape("pre_logits/kernel")[1] if "pre_logits/kernel" in p else None,
        qkv_bias=ATT.format(0) + "query/bias" in p,
    )
    unknown: dict[str, str] = {}
    backbone = None
    if "conv_root/kernel" in p:
        layers = count_stage_units(lambda s, u: f"block{s + 1}/unit{u + 1}/conv1/kernel" in p)
        _, _, cin, root = p.shape("conv_root/kernel")
        backbone = ResNetConfig(layers=layers, width_factor=root / 64)
        fields.update(backbone=backbone, in_channels=cin)  # the embedding's input is the ResNet's output
    if POSEMB in p:
        tokens = p.shape(POSEMB)[1] - (1 if fields["classifier"] == "token" else 0)
        side = math.isqrt(tokens)
        stride = backbone.stride if backbone else 1
        if side * side == tokens:
            fields["image_size"] = (side * kh * stride) if kh == kw else (side * kh * stride, side * kw * stride)
        else:
            unknown["image_size"] = f"the position embedding holds {tokens} patch positions, not a square grid"
    else:
        fields["pos_embed"] = "sincos-2d" if p.big_vision else "none"
        unknown["image_size"] = "there is no learned position embedding to read the grid from"
    # The official numerics are ViTConfig's and ResNetConfig's defaults (tanh GELU, eps 1e-6, WS eps 1e-5).
    return resolve_config(model, fields, unknown, {}, p.path)


def official_to_vitlab(p: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, torch.Tensor]:
    """vit_jax parameters -> vitlab state dict (pure renames, transposes and the q/k/v fuse)."""
    sd: dict[str, torch.Tensor] = {}
    D = config.width
    sd["patch_embed.proj.weight"] = _conv_to_torch(p["embedding/kernel"])
    sd["patch_embed.proj.bias"] = _t(p["embedding/bias"])
    if "cls" in p:
        sd["cls_token"] = _t(p["cls"])
    if POSEMB in p:
        sd["pos_embed"] = _t(p[POSEMB])
    for i in range(_depth(p)):
        q = p[ATT.format(i) + "query/kernel"]
        if q.ndim != 3 or q.shape[1] != config.num_heads:
            raise CheckpointError(f"encoder block {i}: query kernel {q.shape} is not (width, {config.num_heads} "
                                  f"heads, head_dim) as the config says")
        kernels = [q] + [p[ATT.format(i) + f"{n}/kernel"] for n in ("key", "value")]
        # (D, heads, hd) kernels -> one (3D, D) torch weight, q then k then v, heads major as torch's reshape.
        sd[f"blocks.{i}.attn.qkv.weight"] = _t(np.concatenate([k.reshape(D, -1).T for k in kernels]))
        if ATT.format(i) + "query/bias" in p:
            sd[f"blocks.{i}.attn.qkv.bias"] = _t(
                np.concatenate([p[ATT.format(i) + f"{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
            )
        out_kernel = p[ATT.format(i) + "out/kernel"].reshape(-1, D)  # (heads, hd, D) -> (D, D)
        sd[f"blocks.{i}.attn.proj.weight"] = _t(out_kernel.T)
        sd[f"blocks.{i}.attn.proj.bias"] = _t(p[ATT.format(i) + "out/bias"])
        for ours, (theirs, kind) in BLOCK_TABLE.items():
            a = p[ENC.format(i) + theirs]
            sd[f"blocks.{i}.{ours}"] = _t(a.T if kind == "dense" else a)
    for ours, (theirs, kind) in TOP_TABLE.items():
        if theirs in p:
            a = p[theirs]
            sd[ours] = _t(a.T if kind == "dense" else a)
    if "conv_root/kernel" in p:
        sd[BACKBONE + "stem.conv.weight"] = _conv_to_torch(p["conv_root/kernel"])
        for ours, theirs in (("weight", "scale"), ("bias", "bias")):
            sd[BACKBONE + f"stem.norm.{ours}"] = _t(p[f"gn_root/{theirs}"].reshape(-1))  # (1,1,1,C) -> (C,)
        for src, dst in _units(p):
            for n in (1, 2, 3):
                sd[dst + f"conv{n}.weight"] = _conv_to_torch(p[src + f"conv{n}/kernel"])
            for ours, theirs in (("weight", "scale"), ("bias", "bias")):
                for n in (1, 2, 3):
                    sd[dst + f"norm{n}.{ours}"] = _t(p[src + f"gn{n}/{theirs}"].reshape(-1))
                if src + "conv_proj/kernel" in p:
                    sd[dst + f"downsample.norm.{ours}"] = _t(p[src + f"gn_proj/{theirs}"].reshape(-1))
            if src + "conv_proj/kernel" in p:
                sd[dst + "downsample.conv.weight"] = _conv_to_torch(p[src + "conv_proj/kernel"])
    known = set(_official_keys(p))
    unexpected = [k for k in p if k not in known]
    if unexpected:
        raise CheckpointError(f"unexpected arrays ({len(unexpected)}): {unexpected[:20]}")
    return sd


def _units(p: Mapping[str, object]) -> Iterator[tuple[str, str]]:
    s = 1
    while f"block{s}/unit1/conv1/kernel" in p:
        u = 1
        while f"block{s}/unit{u}/conv1/kernel" in p:
            yield f"block{s}/unit{u}/", f"{BACKBONE}stages.{s - 1}.blocks.{u - 1}."
            u += 1
        s += 1


def _official_keys(p: Mapping[str, object]) -> Iterator[str]:
    """Every key the converter reads (to report the rest as unexpected)."""
    yield from ("embedding/kernel", "embedding/bias", "cls", POSEMB)
    yield from (theirs for theirs, _ in TOP_TABLE.values())
    for i in range(_depth(p)):
        for n in ("query", "key", "value", "out"):
            yield from (ATT.format(i) + f"{n}/kernel", ATT.format(i) + f"{n}/bias")
        yield from (ENC.format(i) + theirs for theirs, _ in BLOCK_TABLE.values())
    if "conv_root/kernel" in p:
        yield from ("conv_root/kernel", "gn_root/scale", "gn_root/bias")
        for src, _ in _units(p):
            for n in ("1", "2", "3", "_proj"):
                yield from (src + f"conv{n}/kernel", src + f"gn{n}/scale", src + f"gn{n}/bias")


def load_npz(path: str | os.PathLike, model: str | ViTConfig | dict | None = None) -> VisionTransformer:
    """An official ``.npz`` as a vitlab model with the official numerics (see the module docstring)."""
    p = OfficialParams(path)
    try:
        config = infer_config(p, model)
        try:
            sd = official_to_vitlab(p, config)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except KeyError as e:
            raise CheckpointError(f"{path}: incomplete ViT checkpoint, array {e} is missing") from None
    finally:
        p.close()
    net = model_from_state_dict(config, sd, path)
    net.labels = None
    return net


# ------------------------------------------------------------------------------------------------ writing
def vitlab_to_official(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, np.ndarray]:
    """vitlab state dict -> vit_jax parameters (the layout the official code loads), float32 numpy arrays."""
    return dict(iter_official(sd, config))


def iter_official(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The pairs of :func:`vitlab_to_official` one at a time, so a writer holds one converted array at once."""
    if config.pos_embed not in ("learned-1d", "none") or (config.pos_embed == "none" and config.classifier == "token"):
        raise ValueError(f"the official .npz layout has a learned 1D position embedding; pos_embed="
                         f"{config.pos_embed!r} cannot be written to it")
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}  # no copy for CPU float32 weights
    D, H = config.width, config.num_heads
    hd = D // H
    dense = lambda t: np.ascontiguousarray(t.numpy().T)  # noqa: E731  torch (out, in) -> flax (in, out)
    yield "embedding/kernel", _conv_to_official(sd["patch_embed.proj.weight"])
    yield "embedding/bias", sd["patch_embed.proj.bias"].numpy()
    if "cls_token" in sd:
        yield "cls", sd["cls_token"].numpy()
    if "pos_embed" in sd:
        yield POSEMB, sd["pos_embed"].numpy()
    for i in range(config.depth):
        b = f"blocks.{i}."
        weights = sd[b + "attn.qkv.weight"].reshape(3, D, D)  # q, k, v
        bias = sd.get(b + "attn.qkv.bias")
        # The official attention always has biases; zeros compute the same function as qkv_bias=False.
        biases = (bias if bias is not None else torch.zeros(3 * D)).reshape(3, D)
        for n, w, bb in zip(("query", "key", "value"), weights, biases):
            yield ATT.format(i) + f"{n}/kernel", dense(w).reshape(D, H, hd)  # (D, heads, head_dim)
            yield ATT.format(i) + f"{n}/bias", bb.numpy().reshape(H, hd)
        yield ATT.format(i) + "out/kernel", dense(sd[b + "attn.proj.weight"]).reshape(H, hd, D)
        yield ATT.format(i) + "out/bias", sd[b + "attn.proj.bias"].numpy()
        for ours, (theirs, kind) in BLOCK_TABLE.items():
            t = sd[b + ours]
            yield ENC.format(i) + theirs, dense(t) if kind == "dense" else t.numpy()
    for ours, (theirs, kind) in TOP_TABLE.items():
        if ours in sd:
            yield theirs, dense(sd[ours]) if kind == "dense" else sd[ours].numpy()
    if config.backbone is not None:
        gn = lambda t: t.numpy().reshape(1, 1, 1, -1)  # noqa: E731  (C,) -> (1,1,1,C), the published layout
        yield "conv_root/kernel", _conv_to_official(sd[BACKBONE + "stem.conv.weight"])
        yield "gn_root/scale", gn(sd[BACKBONE + "stem.norm.weight"])
        yield "gn_root/bias", gn(sd[BACKBONE + "stem.norm.bias"])
        pattern = re.compile(re.escape(BACKBONE) + r"stages\.(\d+)\.blocks\.(\d+)\.(\w+)\.(\w+)\.?(\w*)$")
        for key, t in sd.items():
            m = pattern.match(key)
            if not m:
                continue
            s, u, mod, sub, leaf = m.groups()
            src = f"block{int(s) + 1}/unit{int(u) + 1}/"
            if mod == "downsample":
                mod, sub = ("conv_proj" if sub == "conv" else "gn_proj"), leaf
            else:
                mod = mod.replace("norm", "gn")
            if mod.startswith("conv"):
                yield src + f"{mod}/kernel", _conv_to_official(t)
            else:
                yield src + f"{mod}/{'scale' if sub == 'weight' else 'bias'}", gn(t)


def save_npz(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Write ``model`` in the vit_jax ``.npz`` layout (keys joined by ``/``, float32)."""
    cfg = model.config
    if cfg.gelu != "tanh" or cfg.norm_eps != 1e-6:
        logger.warning("the official code computes tanh GELU and LayerNorm eps 1e-6; this model uses gelu=%r, "
                       "norm_eps=%g, so the official code will compute slightly different outputs", cfg.gelu,
                       cfg.norm_eps)
    if cfg.backbone is not None and (cfg.backbone.ws_eps, cfg.backbone.ws_eps_in_sqrt, cfg.backbone.gn_eps) != (
        1e-5, False, 1e-6
    ):
        logger.warning("the official hybrid standardises with (std + 1e-5) and GroupNorm eps 1e-6; this model's "
                       "ResNet epsilons differ, so the official code will compute slightly different outputs")
    arrays = iter_official(model.state_dict(), cfg)

    def write(tmp: Path) -> None:
        # What np.savez writes (one stored "<key>.npy" per array), one array in memory at a time.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, array in arrays:
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    return atomic_write(path, write)
