"""Few-shot linear evaluation (paper Sec. 4.1 "Metrics" and Appendix B.1.1): a regularised least-squares
regression from frozen features onto {-1, 1}^K targets, solved in closed form, as the official big_vision
evaluator (``evaluators/fewshot.py``).

Features are the model's pooled representation (``forward_head(forward_features(x), pre_logits=True)``: the class
token or token mean after the final LayerNorm, through the pre-logits layer when the model has one; the pooled
feature map for a ResNet). Per draw, ``shots`` training images of each class are picked at random; the features
are whitened with the shots' own mean and standard deviation, a large constant feature carries the bias (so it is
almost unregularised), and ``W = (X^T X + l2 I)^-1 X^T Y`` is computed through an eigendecomposition, or its dual
``X^T (X X^T + l2 I)^-1 Y`` when there are fewer points than dimensions. Accuracy is measured on the full test
split and reported as mean and standard deviation over draws.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.precision import autocast

log = logging.getLogger(__name__)

# big_vision's constant bias feature: large, so the l2 penalty on its weight is negligible.
BIAS_CONSTANT = 100.0


@dataclass
class LeastSquaresCache:
    """Everything about the training shots that does not depend on the regularisation strength."""

    mean: torch.Tensor
    std: torch.Tensor
    eigs: torch.Tensor
    lhs: torch.Tensor
    rhs: torch.Tensor


def _whiten(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (x - mean) / std
    return torch.cat([x, torch.full_like(x[:, :1], BIAS_CONSTANT)], dim=1)  # N, D+1


def precompute(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> LeastSquaresCache:
    """Whiten ``x`` (N, D), add the bias feature, turn labels ``y`` (N,) into {-1, 1}^K and eigendecompose the
    Gram matrix of the smaller side, so any l2 is then one diagonal rescaling."""
    x = x.to(torch.float64)
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
    x = _whiten(x, mean, std)
    targets = 2.0 * nn.functional.one_hot(y.long(), num_classes).to(torch.float64) - 1.0  # N, K
    n, d = x.shape
    if n >= d:
        eigs, q = torch.linalg.eigh(x.T @ x)  # (D,), (D, D)
        rhs = q.T @ (x.T @ targets)  # D, K
        lhs = q
    else:
        eigs, q = torch.linalg.eigh(x @ x.T)  # (N,), (N, N)
        rhs = q.T @ targets  # N, K
        lhs = x.T @ q  # D, N
    return LeastSquaresCache(mean, std, eigs, lhs, rhs)


def solve(cache: LeastSquaresCache, l2: float) -> torch.Tensor:
    """The (D+1, K) weights of the regularised least-squares fit (last row: the bias feature's weights)."""
    scaling = 1.0 / (cache.eigs + l2)  # the inverse of (Gram + l2 I) in the eigenbasis
    return (cache.lhs * scaling[None]) @ cache.rhs


def predict(cache: LeastSquaresCache, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class indices for features ``x`` (N, D)."""
    return (_whiten(x.to(torch.float64), cache.mean, cache.std) @ weights).argmax(dim=1)


def fewshot_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     num_classes: int, l2s: list[float]) -> dict[float, float]:
    """Test accuracy (percent) of the least-squares classifier fitted on ``train_x``, for each l2 strength."""
    cache = precompute(train_x, train_y, num_classes)
    out = {}
    for l2 in l2s:
        pred = predict(cache, solve(cache, l2), test_x)
        out[l2] = float((pred == test_y).to(torch.float64).mean() * 100.0)
    return out


def draw_shots(labels: list[int], shots: int, seed: int) -> list[int]:
    """Indices of ``shots`` random examples per class (all of a class's if it has fewer, with a warning)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < shots:
            log.warning("class %d has %d images, fewer than %d shots; using all of them", label, len(idx), shots)
        chosen += rng.sample(idx, min(shots, len(idx)))
    return sorted(chosen)


@torch.no_grad()
def extract_features(model: nn.Module, paths: list[str], *, image_size: int, normalize: str = "official",
                     batch_size: int = 128, precision: str = "auto", progress: bool = False) -> torch.Tensor:
    """(N, F) pooled representations of the images at ``paths`` (decoded and resized as for evaluation)."""
    from vitlab.data.images import load_rgb
    from vitlab.data.transforms import eval_transform

    transform = eval_transform(image_size, normalize)
    device = next(model.parameters()).device
    model.eval()
    feats = []
    batches = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="features", unit="batch", leave=False)
    for start in batches:
        x = torch.stack([transform(load_rgb(p, max_side=image_size)) for p in paths[start:start + batch_size]])
        with autocast(precision, device):
            f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
        feats.append(f.float().cpu())
    return torch.cat(feats)


def fewshot_evaluate(model: nn.Module, data_dir: str | Path, shots: list[int], *, draws: int = 5,
                     l2s: list[float] | None = None, seed: int = 0, image_size: int | None = None,
                     normalize: str = "official", batch_size: int = 128, max_test: int | None = None,
                     precision: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Few-shot linear accuracy of a frozen model on an ImageFolder root (``train/`` for the shots, ``val/`` or
    ``test/`` for the evaluation), for each shot count, over ``draws`` random draws.

    Returns ``{"shots": {k: {"mean", "std", "draws": [...], "l2": ...}}, ...}`` (accuracies in percent). With
    several ``l2s`` every one is reported per shot count (``by_l2``); ``mean``/``std`` use the first.
    """
    from vitlab.data.folder import scan, split_dirs
    from vitlab.train.evaluate import model_image_size

    l2s = l2s or [1.0]
    if not shots or any(k < 1 for k in shots):
        raise ValueError(f"shots must be positive integers, got {shots}")
    train_dir, test_dir = split_dirs(data_dir)
    if test_dir is None:
        raise FileNotFoundError(f"{data_dir}: few-shot evaluation needs a val/ or test/ split next to train/")
    train_samples, classes = scan(train_dir)
    test_samples, _ = scan(test_dir, classes)
    if max_test is not None and len(test_samples) > max_test:
        test_samples = random.Random(seed).sample(test_samples, max_test)
    size = image_size or model_image_size(model)
    train_labels = [label for _, label in train_samples]
    # Decide every draw first and extract features only for the images some draw uses.
    plan = {(k, r): draw_shots(train_labels, k, seed=seed * 1_000_003 + k * 1_009 + r) for k in shots
            for r in range(draws)}
    needed = sorted({i for idx in plan.values() for i in idx})
    where = {i: j for j, i in enumerate(needed)}
    feats = extract_features(model, [train_samples[i][0] for i in needed], image_size=size, normalize=normalize,
                             batch_size=batch_size, precision=precision, progress=progress)
    test_x = extract_features(model, [p for p, _ in test_samples], image_size=size, normalize=normalize,
                              batch_size=batch_size, precision=precision, progress=progress)
    test_y = torch.tensor([label for _, label in test_samples])
    results: dict[str, Any] = {}
    for k in shots:
        per_l2: dict[float, list[float]] = {l2: [] for l2 in l2s}
        for r in range(draws):
            idx = plan[(k, r)]
            x = feats[[where[i] for i in idx]]
            y = torch.tensor([train_labels[i] for i in idx])
            for l2, acc in fewshot_accuracy(x, y, test_x, test_y, len(classes), l2s).items():
                per_l2[l2].append(acc)
        first = per_l2[l2s[0]]
        results[str(k)] = {
            "mean": sum(first) / len(first),
            "std": _std(first),
            "draws": first,
            "l2": l2s[0],
            "by_l2": {str(l2): {"mean": sum(v) / len(v), "std": _std(v)} for l2, v in per_l2.items()},
        }
    return {"shots": results, "num_draws": draws, "num_classes": len(classes), "num_test": len(test_samples),
            "feature_dim": int(test_x.shape[1]), "image_size": size, "seed": seed, "l2s": l2s}


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
