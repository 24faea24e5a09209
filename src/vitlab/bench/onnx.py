"""ONNX export of a vitlab model (torch's dynamo exporter, dynamic batch) and its check with onnxruntime, so a
trained ViT (paper Sec. 3.1) can be served without torch. onnx/onnxruntime are imported only inside functions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from vitlab.io import atomic_write

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4


def _require(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs {module}: pip install onnx onnxscript onnxruntime") from e


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("export_onnx expects a vitlab model (with a .config); got " + type(model).__name__)
    return (config.in_channels, *config.image_hw)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None) -> Path:
    """Write ``model`` (eval mode, fp32) to ``path`` as ONNX with a dynamic batch dimension.

    Input ``images`` (batch, C, H, W) float32, output ``logits`` (batch, K). The file is written to a temporary
    name in the same folder and renamed at the end, so an existing file is never left half-written.
    """
    _require("onnxscript")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX output path must end in .onnx, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(2, *_image_shape(model))
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {} if opset is None else {"opset_version": opset}
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), external_data=False, verbose=False, **kwargs,
        )
    return atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))


def ort_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` using ``threads`` intra-op threads (default: torch's count)."""
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: not a loadable ONNX model ({e})") from e


def check_onnx(model: nn.Module, path: str | os.PathLike, *, batch_sizes: tuple[int, ...] = (1, 3),
               tolerance: float = DEFAULT_TOLERANCE, session=None) -> float:
    """Run the exported file with onnxruntime at several batch sizes; return the largest absolute difference
    from the torch model's logits, raising ``ValueError`` if it exceeds ``tolerance``."""
    session = session or ort_session(path)
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = torch.randn(b, *_image_shape(model), generator=g)
        with torch.no_grad():
            expected = model(x)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        worst = max(worst, float((torch.from_numpy(got) - expected).abs().max()))
    if worst > tolerance:
        raise ValueError(f"{path}: onnxruntime logits differ from torch by {worst:.3g} > {tolerance:g}")
    return worst
