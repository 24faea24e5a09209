"""Official Google ``.npz`` checkpoints: the fixtures of the official JAX code reproduced through ``vitlab.load``
(including the 48-px resize done by the loader), export back to the published layout, nestings, big_vision."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab
from tests.checkpoints.test_native import assert_same_weights, randomize
from tests.conftest import FIXTURES, require
from vitlab.checkpoints import CheckpointError
from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer

NAMES = ["vit_tiny_p4_32", "vit_tiny_p4_32_gap", "vit_tiny_p4_32_repr", "hybrid_r2x2w05_vit_tiny_32"]


def params(name: str) -> Path:
    return require(FIXTURES / f"{name}.params.npz")


def fixture(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(require(FIXTURES / f"{name}.fixture.npz")))


def logits(model: torch.nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_official_fixture_logits(name: str) -> None:
    fx = fixture(name)
    model = vitlab.load(params(name))  # architecture read from the file's shapes alone
    meta = json.loads(str(fx["meta_json"]))
    assert model.config.width == meta["config"]["hidden_size"]
    assert model.config.num_heads == meta["config"]["transformer"]["num_heads"]
    assert model.config.gelu == "tanh" and model.config.norm_eps == 1e-6
    np.testing.assert_allclose(logits(model, fx["inputs_nchw"]), fx["logits"], atol=1e-5, rtol=0)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(torch.from_numpy(fx["inputs_nchw"])), pre_logits=True)
    np.testing.assert_allclose(pre.numpy(), fx["pre_logits"], atol=1e-5, rtol=0)


def test_resize_to_48_pixels_through_the_loader() -> None:
    fx = fixture("vit_tiny_p4_32_resize48")
    model = vitlab.load(params("vit_tiny_p4_32"), image_size=48)
    assert model.config.grid_size == (12, 12)
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), fx["posemb_resized"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(logits(model, fx["inputs_nchw"]), fx["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_the_published_layout(tmp_path: Path, name: str) -> None:
    model = vitlab.load(params(name))
    out = vitlab.save(model, tmp_path / "x.npz", format="npz")
    src, back = np.load(params(name)), np.load(out)
    assert sorted(src.files) == sorted(back.files)
    for k in src.files:
        assert src[k].shape == back[k].shape and np.array_equal(src[k], back[k]), k


@pytest.mark.parametrize(
    "overrides",
    [{}, {"classifier": "gap"}, {"representation_size": 12, "image_size": (16, 24)},
     {"patch_size": 1, "image_size": 16, "backbone": ResNetConfig(layers=(1, 2), width_factor=0.5)}],
)
def test_vitlab_npz_vitlab_round_trip_is_bit_exact(tmp_path: Path, overrides: dict) -> None:
    cfg = ViTConfig(**{**dict(image_size=16, patch_size=4, width=24, depth=2, num_heads=3, mlp_dim=48,
                              num_classes=4), **overrides})
    model = randomize(VisionTransformer(cfg))
    path = vitlab.save(model, tmp_path / "m.npz", format="npz")
    # A non-square grid cannot be read from the shapes; the config says it.
    back = vitlab.load(path, model={"image_size": cfg.image_size} if cfg.grid_size[0] != cfg.grid_size[1] else None)
    assert back.config == cfg
    assert_same_weights(model, back)


@pytest.mark.parametrize("prefix", ["params/", "opt/target/"])
def test_nested_checkpoints(tmp_path: Path, prefix: str) -> None:
    src = np.load(params("vit_tiny_p4_32_gap"))
    optimizer_state = {"opt/state/step": np.zeros(()), "opt/state/mu/head/kernel": src["head/kernel"]}
    np.savez(tmp_path / "nested.npz", **{prefix + k: src[k] for k in src.files},
             **(optimizer_state if prefix == "params/" else {}))
    fx = fixture("vit_tiny_p4_32_gap")
    model = vitlab.load(tmp_path / "nested.npz")
    np.testing.assert_allclose(logits(model, fx["inputs_nchw"]), fx["logits"], atol=1e-5, rtol=0)


def to_big_vision(arrays: dict[str, np.ndarray], scan: bool) -> dict[str, np.ndarray]:
    """Rewrite vit_jax arrays in big_vision's layout: renamed sub-modules, a top-level ``pos_embedding`` without
    the class slot, optionally the scanned encoder (one stacked array per parameter)."""
    out: dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        k = (k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
             .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"))
        if k == "Transformer/posembed_input/pos_embedding":
            k, v = "pos_embedding", v[:, 1:]
        out["params/" + k] = v
    if scan:
        blocks = sorted({k.split("/")[2] for k in out if "/encoderblock_" in k})
        for leaf in [k.split("/", 3)[3] for k in out if "/encoderblock_0/" in k]:
            stacked = [out.pop(f"params/Transformer/{b}/{leaf}") for b in blocks]
            out[f"params/Transformer/encoderblock/{leaf}"] = np.stack(stacked)
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_layout_gets_a_zero_class_slot(tmp_path: Path, scan: bool) -> None:
    cfg = ViTConfig(image_size=16, patch_size=4, width=24, depth=3, num_heads=3, mlp_dim=48, num_classes=4)
    model = randomize(VisionTransformer(cfg))
    with torch.no_grad():
        model.pos_embed[:, 0] = 0  # big_vision's class token carries no position embedding
    vitlab.save(model, tmp_path / "vj.npz", format="npz")
    src = np.load(tmp_path / "vj.npz")
    np.savez(tmp_path / "bv.npz", **to_big_vision({k: src[k] for k in src.files}, scan))
    back = vitlab.load(tmp_path / "bv.npz")
    assert back.config == cfg
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), back(x))


def test_a_name_never_overrides_the_shapes_but_a_full_config_must_match_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The file tells everything here (heads included); the name adds nothing, and the differences are reported.
    shapes = vitlab.load(params("vit_tiny_p4_32"))
    with caplog.at_level("WARNING"):
        named = vitlab.load(params("vit_tiny_p4_32"), model="ViT-B/16")
    assert named.config == shapes.config and (named.config.width, named.config.depth) == (64, 2)
    assert "differ from ViT-B/16" in caplog.text and "depth=2 (not 12)" in caplog.text and "num_heads=4" in caplog.text
    with pytest.raises(CheckpointError) as e:
        wrong_patch = ViTConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128,
                                num_classes=10)
        vitlab.load(params("vit_tiny_p4_32"), model=wrong_patch)
    msg = str(e.value)
    assert "vit_tiny_p4_32.params.npz" in msg and "shape mismatches" in msg and "patch_embed.proj.weight" in msg


def test_non_vit_npz_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", conv1=np.zeros((3, 3)), fc=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"other\.npz: not a ViT checkpoint"):
        vitlab.load(tmp_path / "other.npz")


def test_truncated_npz_is_refused(tmp_path: Path) -> None:
    data = params("vit_tiny_p4_32").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.npz"):
        vitlab.load(tmp_path / "cut.npz")


def test_pickle_offered_as_npz_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"embedding/kernel": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match=r"evil\.npz.*pickle"):
        vitlab.load(tmp_path / "evil.npz")
    # Random bytes are not a pickle, and the message says what they are not (numpy's would say "pickled data").
    (tmp_path / "noise.npz").write_bytes(bytes(range(7, 256)) * 8)
    with pytest.raises(CheckpointError, match=r"noise\.npz: not an \.npz file") as e:
        vitlab.load(tmp_path / "noise.npz")
    assert "pickle" not in str(e.value).split("noise.npz")[1]
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"objects\.npz"):
        vitlab.load(tmp_path / "objects.npz")


def test_non_square_grid_needs_a_config(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=(16, 24), patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=2)
    vitlab.save(VisionTransformer(cfg), tmp_path / "wide.npz", format="npz")
    with pytest.raises(CheckpointError, match=r"wide\.npz.*image_size.*not a square grid"):
        vitlab.load(tmp_path / "wide.npz")
