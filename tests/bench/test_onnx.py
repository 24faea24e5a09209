"""ONNX export round trip (dynamo exporter, dynamic batch) checked with onnxruntime, through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlab
from vitlab.bench.onnx import check_onnx, export_onnx, ort_session
from vitlab.model import ViTConfig, VisionTransformer

TINY = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)


@pytest.mark.slow
def test_cli_export_round_trip(tmp_path, capsys) -> None:
    from vitlab.cli import main

    model = VisionTransformer(TINY).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
    ckpt = vitlab.save(model, tmp_path / "tiny.safetensors")
    assert main(["export", str(ckpt), "--to", "onnx"]) == 0
    onnx_path = tmp_path / "tiny.onnx"
    assert "onnxruntime matches torch" in capsys.readouterr().out
    # Dynamic batch: a batch size never seen at export time, compared with torch independently of check_onnx.
    session = ort_session(onnx_path, threads=1)
    x = torch.randn(5, 3, 16, 16)
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (5, 5)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match="differ from torch"):  # the check can fail: a different model
        other = VisionTransformer(TINY).eval()
        with torch.no_grad():
            other.head.weight.normal_(std=0.5)
        check_onnx(other, onnx_path, session=session)


def test_export_rejects_bad_path_and_bad_checkpoint(tmp_path, capsys) -> None:
    from vitlab.cli import main

    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_onnx(VisionTransformer(TINY), tmp_path / "model.bin")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--to", "onnx"]) == 2  # a user error: one line, no traceback
    assert "broken.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "broken.onnx").exists()
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        ort_session(bad)
