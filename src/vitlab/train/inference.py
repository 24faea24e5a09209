"""Loading a trained checkpoint for evaluation and prediction, and top-k prediction on image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.data.folder import image_files
from vitlab.data.images import IMG_EXTENSIONS, BadImageError, load_rgb
from vitlab.data.transforms import eval_transform
from vitlab.precision import autocast
from vitlab.train.evaluate import model_image_size


def load_for_inference(checkpoint: str | Path, *, format: str | None = None, model: str | None = None,
                       image_size: int | None = None) -> tuple[nn.Module, list[str] | None]:
    """``vitlab.load`` the checkpoint (any supported format; ``model`` names the architecture where the file
    cannot) in eval mode, at ``image_size`` when given (the position embedding resampled as the official code
    does); class names from the file's labels or a ``classes.json`` beside it (None when neither exists)."""
    import vitlab

    kwargs: dict[str, Any] = {k: v for k, v in (("format", format), ("model", model), ("image_size", image_size))
                              if v is not None}
    net = vitlab.load(checkpoint, **kwargs).eval()
    classes = getattr(net, "labels", None)
    sidecar = Path(checkpoint).parent / "classes.json"
    if classes is None and Path(checkpoint).exists() and sidecar.is_file():
        classes = json.loads(sidecar.read_text())
    return net, classes


def resolve_eval_dir(data: str | Path) -> Path:
    """``DIR/val`` or ``DIR/test`` when present (a training data root), else ``DIR`` itself (``<class>/<image>``)."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data directory not found: {root}")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return root


def expand_images(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted, each real file once, see
    :func:`vitlab.data.folder.image_files`) to their image files. A folder without images is an error."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise FileNotFoundError(f"{p}: no image files (extensions {', '.join(IMG_EXTENSIONS)})")
            paths += [Path(f) for f in found]
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return paths


@torch.no_grad()
def predict(model: nn.Module, images: list[str | Path], *, classes: list[str] | None = None, top_k: int = 5,
            normalize: str = "official", batch_size: int = 64, precision: str = "auto") -> list[dict[str, Any]]:
    """Top-k classes with probabilities per image: ``{"path", "top": [{"label", "index", "prob"}...]}`` or
    ``{"path", "error"}`` for a file that cannot be decoded."""
    transform = eval_transform(model_image_size(model), normalize)
    paths = expand_images(images)
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk, tensors, slots = paths[start:start + batch_size], [], []
        for p in chunk:
            try:
                tensors.append(transform(load_rgb(p, max_side=model_image_size(model))))
                slots.append(len(results))
                results.append({"path": str(p)})
            except BadImageError as e:
                results.append({"path": str(p), "error": e.reason})
        if not tensors:
            continue
        x = torch.stack(tensors)
        with torch.no_grad(), autocast(precision, x.device):
            probs = model(x).float().softmax(dim=-1)
        k = min(top_k, probs.shape[1])
        top = probs.topk(k, dim=1)
        for slot, values, indices in zip(slots, top.values.tolist(), top.indices.tolist()):
            results[slot]["top"] = [{"label": classes[i] if classes else str(i), "index": i, "prob": v}
                                    for v, i in zip(values, indices)]
    return results
