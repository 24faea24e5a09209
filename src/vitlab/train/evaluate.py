"""Evaluation of a classifier on an image folder or a loader: top-1/top-5, loss, per-class accuracy, confusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from vitlab.data.folder import SafeImageFolder, collate_skip_bad
from vitlab.data.loaders import ignore_sigint
from vitlab.data.transforms import eval_transform
from vitlab.io import atomic_write
from vitlab.precision import autocast, resolve


def model_image_size(model: nn.Module, default: int = 224) -> int:
    config = getattr(model, "config", None)
    hw = getattr(config, "image_hw", None)
    return int(hw[0]) if hw else default


def folder_eval_loader(root: str | Path, image_size: int, *, normalize: str = "official", batch_size: int = 256,
                       workers: int = 2, classes: list[str] | None = None) -> DataLoader:
    dataset = SafeImageFolder(root, eval_transform(image_size, normalize), classes=classes, max_side=image_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip_bad,
                      worker_init_fn=ignore_sigint)


@torch.no_grad()
def evaluate(model: nn.Module, loader_or_dir: Iterable | str | Path, *, image_size: int | None = None,
             normalize: str = "official", batch_size: int = 256, workers: int = 2, num_classes: int | None = None,
             classes: list[str] | None = None, precision: str = "auto", device: torch.device | str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` (any module returning logits) on a folder (``<class>/<image>``) or an iterable of
    ``(images, labels)`` or ``(images, labels, bad)`` batches.

    Returns ``top1``, ``top5`` (percent), ``loss`` (mean cross-entropy), ``n``, ``per_class`` (percent per class),
    ``confusion`` (rows: true class, columns: predicted), ``classes`` and ``skipped`` (unreadable files).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(loader_or_dir, (str, Path)):
        loader = folder_eval_loader(loader_or_dir, image_size or model_image_size(model), normalize=normalize,
                                    batch_size=batch_size, workers=workers, classes=classes)
        classes = classes or loader.dataset.classes
    else:
        loader = loader_or_dir
    was_training = model.training
    model.eval()
    total_loss, n, correct1, correct5 = 0.0, 0, 0, 0
    confusion: torch.Tensor | None = None
    skipped: list[str] = []
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", unit="batch", leave=False)
    for batch in loader:
        x, y = batch[0], batch[1]
        if len(batch) > 2:
            skipped += [b.path for b in batch[2]]
        if len(y) == 0:
            continue
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = model(x)
        logits = logits.float()
        K = logits.shape[1]
        if confusion is None:
            confusion = torch.zeros(num_classes or K, num_classes or K, dtype=torch.long)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, K), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        confusion.index_put_((y.cpu(), top[:, 0].cpu()), torch.ones(len(y), dtype=torch.long), accumulate=True)
        n += len(y)
    model.train(was_training)
    if n == 0 or confusion is None:
        raise ValueError("evaluation set is empty (no readable images)")
    per_class_n = confusion.sum(dim=1)
    per_class = (confusion.diag().double() / per_class_n.clamp(min=1) * 100).tolist()
    names = classes or [str(i) for i in range(len(per_class))]
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": total_loss / n,
        "n": n,
        "per_class": {name: acc for name, acc, cnt in zip(names, per_class, per_class_n.tolist()) if cnt > 0},
        "confusion": confusion.tolist(),
        "classes": names,
        "skipped": skipped,
        "precision": resolve(precision, device),
    }


def plot_confusion(result: dict[str, Any], path: str | Path) -> Path:
    """Draw ``result["confusion"]`` (row-normalised) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.tensor(result["confusion"], dtype=torch.float64)
    norm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    names = result["classes"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * k + 2), max(4, 0.5 * k + 1.5)))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        for i in range(k):
            for j in range(k):
                if cm[i, j] > 0:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {result['top1']:.2f}% on {result['n']} images")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
