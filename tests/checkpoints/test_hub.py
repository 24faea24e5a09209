"""Hub loading through huggingface_hub, from a local cache built by the test (never the network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vitlab
from tests.checkpoints.test_native import randomize
from vitlab.checkpoints import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_transformers_repo_from_the_cache(tmp_path: Path, cache: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=2, id2label={0: "cat", 1: "dog"})
    ref = randomize(transformers.ViTForImageClassification(cfg))
    ref.save_pretrained(tmp_path / "src")
    put_in_cache(cache, "google/vit-tiny-test",
                 {n: tmp_path / "src" / n for n in ("config.json", "model.safetensors")})
    model = vitlab.load("hf-hub:google/vit-tiny-test")
    assert model.labels == ["cat", "dog"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_timm_repo_from_the_cache(tmp_path: Path, cache: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    # A timm hub repo: config.json names the architecture, which decides the heads (ViT-Ti/16: 3).
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 4, "global_pool": "token",
        "label_names": ["n01", "n02", "n03", "n04"],
        "pretrained_cfg": {"tag": "test", "input_size": [3, 32, 32]},
    }))
    put_in_cache(cache, "timm/vit_tiny_patch16_224.test",
                 {n: tmp_path / n for n in ("config.json", "model.safetensors")})
    model = vitlab.load("hf-hub:timm/vit_tiny_patch16_224.test")
    assert model.config.num_heads == 3 and model.config.gelu == "exact" and model.config.image_hw == (32, 32)
    assert model.labels == ["n01", "n02", "n03", "n04"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


def test_missing_file_offline_names_repo_file_and_remedy(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    put_in_cache(cache, "google/vit-missing", {"config.json": tmp_path / "config.json"})
    with pytest.raises(CheckpointError) as e:
        vitlab.load("hf-hub:google/vit-missing")
    msg = str(e.value)
    assert "google/vit-missing" in msg and "model.safetensors" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download" in msg and str(cache) in msg


def test_uncached_repo_offline(cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"google/nothing.*config\.json.*HF_HUB_OFFLINE"):
        vitlab.load("hf-hub:google/nothing")
