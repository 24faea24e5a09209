"""The shared entry points: format detection, the explicit fine-tuning adaptations (new head, dropped
pre-logits, resize), and the ``vitlab convert`` command, in-process and as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab
from tests.checkpoints.test_native import TINY
from tests.conftest import FIXTURES, REPO, require
from vitlab.checkpoints import CheckpointError, detect_format
from vitlab.cli import main
from vitlab.model import ViTConfig, VisionTransformer

REPR = FIXTURES / "vit_tiny_p4_32_repr.params.npz"


def test_new_head_is_zero_initialised_and_keeps_the_body() -> None:
    src = vitlab.load(require(REPR))
    model = vitlab.load(REPR, num_classes=7)
    assert model.config.num_classes == 7 and model.head.weight.shape == (7, 32)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   src.forward_head(src.forward_features(x), pre_logits=True), atol=0, rtol=0)
        assert torch.count_nonzero(model(x)) == 0


def test_drop_pre_logits_as_the_paper_fine_tunes() -> None:
    model = vitlab.load(require(REPR), drop_pre_logits=True, num_classes=5)
    assert model.pre_logits is None and model.config.representation_size is None
    assert model.head.weight.shape == (5, 64)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        pooled = model.pool(model.forward_features(x))
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), pooled)


def test_new_head_drops_stale_labels(tmp_path: Path) -> None:
    model = VisionTransformer(ViTConfig(**TINY))
    model.labels = list("abcde")
    vitlab.save(model, tmp_path / "m.safetensors")
    assert vitlab.load(tmp_path / "m.safetensors", num_classes=5).labels == list("abcde")
    assert vitlab.load(tmp_path / "m.safetensors", num_classes=3).labels is None


def test_format_detection(tmp_path: Path) -> None:
    assert detect_format(require(REPR)) == "npz"
    vitlab.save(VisionTransformer(ViTConfig(**TINY)), tmp_path / "m.safetensors")
    assert detect_format(tmp_path / "m.safetensors") == "vitlab"
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"w\.pth.*format="):
        vitlab.load(tmp_path / "w.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        vitlab.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="format must be one of"):
        vitlab.load(REPR, format="onnx")


def test_convert_command_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fx = dict(np.load(require(FIXTURES / "vit_tiny_p4_32_resize48.fixture.npz")))
    dst = tmp_path / "v48.safetensors"
    src = require(FIXTURES / "vit_tiny_p4_32.params.npz")
    assert main(["convert", str(src), str(dst), "--from", "npz", "--to", "vitlab", "--image-size", "48", "-q"]) == 0
    model = vitlab.load(dst)
    with torch.no_grad():
        logits = model(torch.from_numpy(fx["inputs_nchw"])).numpy()
    np.testing.assert_allclose(logits, fx["logits"], atol=1e-5, rtol=0)
    assert main(["convert", str(tmp_path / "missing.npz"), str(tmp_path / "x.safetensors"), "-q"]) == 2
    assert "missing.npz: no such file" in capsys.readouterr().err


def test_convert_command_subprocess(tmp_path: Path) -> None:
    src = require(FIXTURES / "vit_tiny_p4_32_gap.params.npz")
    out = subprocess.run([sys.executable, "-m", "vitlab", "convert", str(src), str(tmp_path / "t.safetensors"),
                          "--to", "timm"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reading vit_tiny_p4_32_gap.params.npz" in out.stderr  # the progress bar
    back = vitlab.load(tmp_path / "t.safetensors", format="timm", model={"num_heads": 4, "gelu": "tanh"})
    ref = vitlab.load(src)
    assert back.config == ref.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))
