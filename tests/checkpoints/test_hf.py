"""Hugging Face transformers ViT checkpoints: random-weight transformers models (the independent reference)
saved with ``save_pretrained`` and loaded by vitlab, and vitlab exports loaded by ``from_pretrained``, compute
the same outputs; round trips are bit-exact; labels travel as ``id2label``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitlab
from tests.checkpoints.test_native import assert_same_weights, randomize
from vitlab.checkpoints import CheckpointError
from vitlab.model import ViTConfig, VisionTransformer

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=4)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_classifier(tmp_path: Path, **kwargs) -> tuple[torch.nn.Module, Path]:
    cfg = transformers.ViTConfig(**{**TINY, "num_labels": 3, **kwargs})
    ref = randomize(transformers.ViTForImageClassification(cfg))
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}, {"image_size": [16, 32], "patch_size": 8},
     {"qkv_bias": False, "patch_size": 8}],
)
def test_transformers_classifier_loaded_by_vitlab(tmp_path: Path, kwargs: dict) -> None:
    ref, directory = hf_classifier(tmp_path, **kwargs)
    model = vitlab.load(directory)  # the format comes from config.json
    assert model.config.norm_eps == kwargs.get("layer_norm_eps", 1e-12)
    assert model.config.gelu == ("tanh" if "hidden_act" in kwargs else "exact")
    assert model.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    x = torch.randn(2, 3, *model.config.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_transformers_pooler_is_the_pre_logits_layer(tmp_path: Path) -> None:
    ref = randomize(transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=True))
    ref.save_pretrained(tmp_path / "hf")
    model = vitlab.load(tmp_path / "hf", format="hf")
    assert model.config.representation_size == 32 and model.config.num_classes == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = ref(pixel_values=x)
        torch.testing.assert_close(model(x), out.pooler_output, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(x), out.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("image_size, patch", [(16, 4), ((16, 32), 8)])
def test_vitlab_export_loaded_by_transformers(tmp_path: Path, image_size, patch: int) -> None:
    cfg = ViTConfig(image_size=image_size, patch_size=patch, width=32, depth=2, num_heads=4, mlp_dim=64,
                    num_classes=3, gelu="exact", norm_eps=1e-12)
    model = randomize(VisionTransformer(cfg))
    vitlab.save(model, tmp_path / "out", format="hf", labels=["cat", "dog", "frog"])
    ref = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert ref.config.id2label == {0: "cat", 1: "dog", 2: "frog"}
    x = torch.randn(2, 3, *cfg.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(ref(pixel_values=x).logits, model(x), atol=1e-5, rtol=0)


def test_pre_logits_model_exports_as_vit_model_with_pooler(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=0,
                    representation_size=16, gelu="tanh", norm_eps=1e-6)
    model = randomize(VisionTransformer(cfg))
    vitlab.save(model, tmp_path / "out", format="hf")
    ref = transformers.ViTModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ref(pixel_values=x).pooler_output, model(x), atol=1e-5, rtol=0)


def test_vitlab_hf_vitlab_round_trip_is_bit_exact(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=(16, 24), patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=3,
                    gelu="exact", norm_eps=1e-12)
    model = randomize(VisionTransformer(cfg))
    model.labels = ["a", "b", "c"]
    vitlab.save(model, tmp_path / "out", format="hf")
    back = vitlab.load(tmp_path / "out")
    assert back.config == cfg and back.labels == ["a", "b", "c"]
    assert_same_weights(model, back)


def test_config_without_weights_is_refused(tmp_path: Path) -> None:
    _, directory = hf_classifier(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"hf.*config\.json but no weights"):
        vitlab.load(directory)


def test_weights_that_do_not_fit_config_json(tmp_path: Path) -> None:
    _, directory = hf_classifier(tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*encoder\.layer\.2"):
        vitlab.load(directory)


def test_gap_and_hybrid_models_cannot_be_written_to_hf(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3,
                    classifier="gap")
    with pytest.raises(ValueError, match="class token"):
        vitlab.save(VisionTransformer(cfg), tmp_path / "out", format="hf")
    assert not (tmp_path / "out" / "model.safetensors").exists()
