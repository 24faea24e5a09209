"""The studies' figures, in the shape of the paper's: accuracy against training-set size on a log axis (Fig. 3/4),
accuracy against sequence length and compute (Fig. 5's axes, for the patch-size study), and the position-embedding
ablation (Appendix D.4) with each embedding's topology score. Only this module of the study imports matplotlib,
inside the functions; figures are written atomically with ``matplotlib.figure.Figure`` (no pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitlab.io import atomic_write


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a declared dependency
        raise ImportError("the study plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def short_label(spec: str) -> str:
    """A legend label for a model spec: ``ViT (width 128, depth 4, patch 4)``, ``ResNet-26 (width x0.5)``."""
    from vitlab.model import ViTConfig, config_from_name
    from vitlab.study.runner import parse_model_spec

    name, overrides = parse_model_spec(spec)
    if not overrides:
        return name
    cfg = config_from_name(name, **overrides)
    if isinstance(cfg, ViTConfig):
        return f"ViT (width {cfg.width}, depth {cfg.depth}, patch {cfg.patch_hw[0]})"
    return f"{name} (width x{cfg.backbone.width_factor:g})"


def plot_data_size(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy against the number of training images (log axis), one line per model."""
    fig, ax = _figure(5.5, 3.8)
    models: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        models.setdefault(r["label"]["model"], []).append((r["num_train"], r["top1"]))
    for i, (model, points) in enumerate(models.items()):
        points.sort()
        style = "o-" if model.startswith("ViT") or "+ViT" in model else "s--"
        ax.plot([n for n, _ in points], [a for _, a in points], style, label=short_label(model), color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("training images (nested class-balanced subsets)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs training-set size", fontsize=10)
    return _save(fig, path)


def plot_patch_size(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Two panels: accuracy against sequence length, and against forward GFLOPs per image."""
    fig, (left, right) = _figure(8.5, 3.6, ncols=2)
    rows = sorted(results, key=lambda r: r["info"]["sequence_length"])
    seq = [r["info"]["sequence_length"] for r in rows]
    acc = [r["top1"] for r in rows]
    left.plot(seq, acc, "o-")
    left.set_xscale("log", base=2)
    left.set_xticks(seq, [str(s) for s in seq])
    left.set_xlabel("sequence length (patches)")
    left.set_ylabel("test top-1 accuracy (%)")
    for r in rows:
        left.annotate(f"/{r['info']['patch_size']}", (r["info"]["sequence_length"], r["top1"]),
                      textcoords="offset points", xytext=(4, -10), fontsize=8)
    flops = [r["info"]["gflops_per_image"] for r in rows]
    if all(f is not None for f in flops):
        right.plot(flops, acc, "o-", color="C1")
        from matplotlib.ticker import NullFormatter

        right.set_xscale("log")
        right.xaxis.set_minor_formatter(NullFormatter())
        right.set_xlabel("forward GFLOPs per image")
    else:
        right.text(0.5, 0.5, "FLOPs not available", ha="center", va="center", transform=right.transAxes)
    right.set_ylabel("test top-1 accuracy (%)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    base = short_label(rows[0]["label"]["model"]).split(", patch")[0].rstrip(")") + ")"
    fig.suptitle(f"{base}: same width and depth, smaller patches", fontsize=10)
    return _save(fig, path)


def plot_pos_embed(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of test accuracy per position embedding, each labelled with its trained topology score."""
    fig, ax = _figure(5.5, 3.6)
    names = [r["label"]["pos_embed"] for r in results]
    acc = [r["top1"] for r in results]
    bars = ax.bar(range(len(names)), acc, color=[f"C{i}" for i in range(len(names))])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test top-1 accuracy (%)")
    low = min(acc)
    ax.set_ylim(max(0.0, low - 10.0), max(acc) + 5.0)
    for bar, r in zip(bars, results):
        score = r.get("topology")
        text = f"{r['top1']:.1f}%" + ("" if score is None else f"\nρ={score:+.2f}")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, textcoords="offset points", xytext=(0, 2))
    ax.set_title(f"{short_label(results[0]['label']['model'])}\nρ: Spearman of embedding similarity vs grid distance",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_resolution(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy against training compute (pre-training included for fine-tunes), one series per way of
    reaching a resolution, each point labelled with its resolution."""
    from matplotlib.ticker import NullFormatter

    fig, ax = _figure(6.0, 4.0)
    series = {"pretrain": ("pre-training", "o"), "interpolated": ("fine-tune, interpolated", "o-"),
              "unchanged": ("fine-tune, interpolated", "o-"),
              "not-interpolated": ("fine-tune, not interpolated", "s--"), "scratch": ("from scratch", "^:")}
    points: dict[str, list[tuple[float, float, int]]] = {}
    for r in results:
        kind = r["label"]["kind"]
        name = kind if kind != "finetune" else r["info"]["pos_embed"]
        points.setdefault(series[name][0], []).append((r["info"]["training_tflops"], r["top1"],
                                                       r["info"]["image_size"]))
    styles = {label: style for label, style in series.values()}
    for i, (label, pts) in enumerate(points.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[label], label=label,
                color="k" if label == "pre-training" else f"C{i}")
        for x, y, size in pts:
            ax.annotate(f"{size}px", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    # A log axis over less than a decade may hold no labelled major tick: label the cells' own compute instead.
    computes = sorted({x for pts in points.values() for x, _, _ in pts})
    ax.set_xticks(computes, [f"{x:.3g}" for x in computes])
    ax.set_xlabel("training compute (TFLOPs, pre-training included)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    pre = [r["info"]["image_size"] for r in results if r["label"]["kind"] == "pretrain"]
    ax.set_title("Fine-tuning at the same and higher resolutions"
                 + (f" (pre-trained at {pre[0]} px)" if pre else ""), fontsize=10)
    return _save(fig, path)


def plot_transfer(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Target test accuracy against images per class (log axis): fine-tuned with each recipe, from scratch, and
    few-shot linear probes of the pre-trained (and of randomly initialised) features."""
    fig, ax = _figure(6.0, 4.0)
    names = {"finetune-paper": ("fine-tune, paper recipe", "o-"),
             "finetune-small": ("fine-tune, small-data recipe", "s-"), "scratch": ("from scratch", "^--")}
    lines: dict[str, list[tuple[int, float]]] = {}
    pre = None
    for r in results:
        if r["key"] == "pretrain":
            pre = r
            continue
        lines.setdefault(r["label"]["kind"], []).append((r["info"]["per_class"], r["top1"]))
    for i, kind in enumerate(k for k in names if k in lines):
        pts = sorted(lines[kind])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], names[kind][1], label=names[kind][0], color=f"C{i}")
    if pre is not None:
        for key, label, style in (("fewshot", "few-shot linear, pre-trained features", "d:"),
                                  ("fewshot_random_init", "few-shot linear, random-init features", "x:")):
            shots = sorted(pre[key]["shots"].items(), key=lambda kv: int(kv[0]))
            ax.plot([int(k) for k, _ in shots], [v["mean"] for _, v in shots], style, label=label,
                    color="C3" if key == "fewshot" else "0.5")
        ax.axhline(100.0 / pre["chain"]["num_classes"], color="0.7", lw=0.8, ls="-", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("target training images per class")
    ax.set_ylabel("target test top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Pre-trained on the source, fine-tuned on the target", fontsize=10)
    return _save(fig, path)
