"""vitlab's native safetensors format: the file alone rebuilds the model, bit-exactly, with its class names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vitlab
from vitlab.checkpoints import CheckpointError
from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter non-zero random values, so a weight mapped wrongly changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"classifier": "gap", "gelu": "exact", "norm_eps": 1e-5},
        {"representation_size": 16, "image_size": (32, 48)},
        {"pos_embed": "learned-2d", "qkv_bias": False},
        {"pos_embed": "sincos-2d"},
        {"patch_size": 1, "backbone": ResNetConfig(layers=(1, 1), width_factor=0.5, ws_eps=1e-8, ws_eps_in_sqrt=True)},
    ],
)
def test_round_trip_is_bit_exact_and_keeps_config(tmp_path: Path, overrides: dict) -> None:
    model = randomize(VisionTransformer(ViTConfig(**{**TINY, **overrides})))
    path = vitlab.save(model, tmp_path / "m.safetensors")
    loaded = vitlab.load(path)
    assert type(loaded) is VisionTransformer and loaded.config == model.config
    assert loaded.labels is None and not loaded.training
    assert_same_weights(model, loaded)
    x = torch.randn(2, 3, *model.config.image_hw)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_metadata_holds_config_json_version_and_labels(tmp_path: Path) -> None:
    model = VisionTransformer(ViTConfig(**TINY))
    labels = ["cat", "dog", "bird", "fish", "frog"]
    vitlab.save(model, tmp_path / "m.safetensors", labels=labels)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "vitlab" and meta["format_version"] == "1"
    assert meta["config_class"] == "vitlab.model.config:ViTConfig"
    assert ViTConfig.from_json(meta["config"]) == model.config
    assert json.loads(meta["labels"]) == labels
    assert vitlab.load(tmp_path / "m.safetensors").labels == labels


def test_labels_attribute_is_saved_and_validated(tmp_path: Path) -> None:
    model = VisionTransformer(ViTConfig(**TINY))
    model.labels = list("abcde")
    vitlab.save(model, tmp_path / "m.safetensors")
    assert vitlab.load(tmp_path / "m.safetensors").labels == list("abcde")
    with pytest.raises(ValueError, match="3 labels"):
        vitlab.save(model, tmp_path / "bad.safetensors", labels=["a", "b", "c"])
    assert not (tmp_path / "bad.safetensors").exists()


def test_bfloat16_weights_keep_their_dtype(tmp_path: Path) -> None:
    model = VisionTransformer(ViTConfig(**TINY)).to(torch.bfloat16)
    loaded = vitlab.load(vitlab.save(model, tmp_path / "m.safetensors"))
    assert_same_weights(model, loaded)


def test_failed_save_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    model = randomize(VisionTransformer(ViTConfig(**TINY)))
    vitlab.save(model, path)
    before = path.read_bytes()

    class NoConfig(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="config"):
        vitlab.save(NoConfig(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_truncated_file_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    vitlab.save(VisionTransformer(ViTConfig(**TINY)), path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        vitlab.load(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*truncated"):
        vitlab.load(tmp_path / "tiny.safetensors")


def test_pickle_offered_as_native_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(2)}, path)  # a zip archive holding a pickle
    with pytest.raises(CheckpointError, match=r"evil\.safetensors.*pickle"):
        vitlab.load(path, format="vitlab")


def test_foreign_safetensors_needs_a_format(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="format='timm'"):
        vitlab.load(tmp_path / "w.safetensors")


def test_metadata_cannot_import_foreign_classes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    meta = {"format": "vitlab", "format_version": "1", "config_class": "os:system",
            "model_class": "vitlab.model.vit:VisionTransformer", "config": "{}", "labels": "null"}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="not a vitlab class"):
        vitlab.load(tmp_path / "x.safetensors")


def test_weights_that_do_not_fit_the_config_list_the_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = VisionTransformer(ViTConfig(**TINY))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["norm.weight"] = torch.zeros(7)
    meta = {"format": "vitlab", "format_version": "1", "config_class": "vitlab.model.config:ViTConfig",
            "model_class": "vitlab.model.vit:VisionTransformer", "config": model.config.to_json(), "labels": "null"}
    save_file(sd, str(tmp_path / "x.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError) as e:
        vitlab.load(tmp_path / "x.safetensors")
    msg = str(e.value)
    assert "x.safetensors" in msg and "head.bias" in msg and "extra.weight" in msg
    assert "norm.weight: checkpoint (7,) vs model (32,)" in msg


def test_any_vitlab_model_with_a_config_travels_e_g_the_resnet_classifier(tmp_path: Path) -> None:
    model = randomize(vitlab.create_model("ResNet-50", num_classes=3, image_size=32, width_factor=0.5, layers=(1, 1)))
    vitlab.save(model, tmp_path / "r.safetensors", labels=["a", "b", "c"])
    with safe_open(tmp_path / "r.safetensors", "pt") as f:
        assert f.metadata()["model_class"] == "vitlab.model.resnet_classifier:ResNetClassifier"
    loaded = vitlab.load(tmp_path / "r.safetensors")
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.labels == ["a", "b", "c"]
    assert_same_weights(model, loaded)
    tuned = vitlab.load(tmp_path / "r.safetensors", num_classes=5, image_size=64)
    assert tuned.config.num_classes == 5 and tuned.config.image_hw == (64, 64) and tuned.labels is None
    assert tuned.head.weight.shape == (5, model.config.width) and torch.count_nonzero(tuned.head.weight) == 0


def test_wrapped_models_are_saved_without_wrapper_prefixes(tmp_path: Path) -> None:
    model = randomize(VisionTransformer(ViTConfig(**TINY)))
    vitlab.save(torch.nn.DataParallel(model), tmp_path / "m.safetensors")
    assert_same_weights(model, vitlab.load(tmp_path / "m.safetensors"))
