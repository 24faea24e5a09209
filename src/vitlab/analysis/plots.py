"""Every figure of ``vitlab inspect`` (the paper's Fig. 6 and Fig. 7), drawn with matplotlib.

This is the only module of vitlab that imports matplotlib, and it does so inside the functions, so importing
``vitlab.analysis`` stays torch-only. The functions take the tensors the analysis functions return and write a PNG
atomically (temporary file, then rename); they use ``matplotlib.figure.Figure`` directly rather than pyplot, so no
global backend state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitlab.io import atomic_write

DPI = 100
IMAGE_DPI = 80  # figures made of photographs compress badly; a lower resolution keeps each PNG well under 300 KB


def _figure(width: float, height: float, dpi: int = DPI) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a declared dependency
        raise ImportError("vitlab's figures need matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def _save(fig: Any, path: str | Path, palette: bool = False) -> Path:
    """Write ``fig`` as PNG atomically; ``palette=True`` quantises to 256 colours (photo figures shrink ~3x with
    no visible change at this resolution)."""
    def write(tmp: Path) -> None:
        if palette:
            import io

            from PIL import Image

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=fig.dpi)
            buf.seek(0)
            with Image.open(buf) as img:
                img.convert("RGB").quantize(colors=256).save(tmp, format="PNG", optimize=True)
        else:
            fig.savefig(tmp, format="png", dpi=fig.dpi)

    return atomic_write(path, write)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] (a principal component has no natural intensity scale)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) -> (B, H, W) by bilinear interpolation, for overlaying patch-level maps on images."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _hwc(img: torch.Tensor) -> Any:
    return img.permute(1, 2, 0).clamp(0, 1).numpy()  # H, W, C for imshow


def plot_filters(components: torch.Tensor, explained: torch.Tensor, path: str | Path, columns: int = 7) -> Path:
    """Fig. 7 left: the principal components (k, C, ph, pw) as RGB patches, each titled with its explained
    variance in percent."""
    k = components.shape[0]
    rows = -(-k // columns)
    fig = _figure(columns * 1.0, rows * 1.1 + 0.4)
    for i in range(k):
        ax = fig.add_subplot(rows, columns, i + 1)
        comp = _to_unit(components[i])
        img = comp if comp.shape[0] == 3 else comp.mean(dim=0, keepdim=True).expand(3, -1, -1)
        ax.imshow(_hwc(img), interpolation="nearest")
        ax.set_title(f"{100 * float(explained[i]):.1f}%", fontsize=7)
        ax.set_axis_off()
    fig.suptitle("RGB embedding filters (first %d principal components)" % k, fontsize=9)
    return _save(fig, path)


def plot_pos_embed_similarity(similarity: torch.Tensor, path: str | Path, spearman: float | None = None) -> Path:
    """Fig. 7 centre: one small map per grid position (at that position in the grid) showing the cosine
    similarity of its embedding with every position's. Drawn as a single mosaic image, which stays fast and
    small for 14x14 or larger grids."""
    n, gh, gw = similarity.shape
    gap = 1
    mosaic = torch.full((gh * (gh + gap), gw * (gw + gap)), float("nan"))
    for i in range(n):
        r, c = divmod(i, gw)
        y, x = r * (gh + gap), c * (gw + gap)
        mosaic[y:y + gh, x:x + gw] = similarity[i]
    size = min(9.0, max(4.0, 0.45 * gw))
    fig = _figure(size + 0.8, size * gh / gw)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (gw + gap) + gw / 2 - 0.5 for c in range(gw)], [str(c + 1) for c in range(gw)], fontsize=6)
    ax.set_yticks([r * (gh + gap) + gh / 2 - 0.5 for r in range(gh)], [str(r + 1) for r in range(gh)], fontsize=6)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    title = "Position embedding similarity"
    if spearman is not None:
        title += f"\nSpearman vs. grid distance: {spearman:.3f}"
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("Cosine similarity", fontsize=8)
    return _save(fig, path)


def plot_attention_distance(distance: torch.Tensor, path: str | Path, uniform: float | None = None,
                            title: str = "Mean attention distance") -> Path:
    """Fig. 7 right: (depth, heads) mean attention distance in pixels, one point per head, against depth;
    ``uniform`` (the distance of a head attending equally everywhere) is drawn as a dashed line for scale."""
    depth, heads = distance.shape
    fig = _figure(4.2, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    try:
        from matplotlib import colormaps
        cmap = colormaps["tab20"]
    except ImportError:  # pragma: no cover
        cmap = None
    for h in range(heads):
        color = cmap(h % 20) if cmap is not None else None
        ax.scatter(torch.arange(1, depth + 1).numpy(), distance[:, h].numpy(), s=10, color=color,
                   label=f"Head {h + 1}" if heads <= 16 else None)
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(range(1, depth + 1))
    top = float(distance.max())
    if uniform is not None:
        ax.axhline(uniform, color="grey", linestyle="--", linewidth=0.8, label="uniform attention")
        top = max(top, uniform)
    ax.set_ylim(0, max(top * 1.1, 1.0))
    if heads <= 16 or uniform is not None:
        ax.legend(fontsize=5, ncol=2, loc="lower right", markerscale=0.8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, path: str | Path,
                 titles: Sequence[str] | None = None, columns: int = 4) -> Path:
    """Fig. 6: each input image next to the image weighted by its attention-rollout map (upsampled to the image
    and scaled so its maximum is 1)."""
    n = images.shape[0]
    up = _upsample(maps, tuple(images.shape[-2:]))  # n, H, W
    up = up / up.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    rows = -(-n // columns)
    fig = _figure(columns * 2.2, rows * 1.25 + 0.3, dpi=IMAGE_DPI)
    for i in range(n):
        for j, img in enumerate((images[i], images[i] * up[i][None])):
            ax = fig.add_subplot(rows, 2 * columns, 2 * i + j + 1)
            ax.imshow(_hwc(img), interpolation="bilinear")
            ax.set_axis_off()
            if titles is not None and j == 0:
                ax.set_title(titles[i], fontsize=6)
            elif j == 1:
                ax.set_title("attention", fontsize=6)
    fig.suptitle("Attention rollout (input | input x rollout map)", fontsize=9)
    return _save(fig, path, palette=True)


def plot_query_attention(images: torch.Tensor, attention: torch.Tensor, layers: Sequence[int], path: str | Path,
                         query_label: str, query_rc: tuple[int, int] | None = None, head_label: str = "mean of heads",
                         patch_hw: tuple[int, int] | None = None) -> Path:
    """Raw attention of one query token to the patches: ``attention`` (n, len(layers), gh, gw), one row per image,
    one column per layer, the heat map overlaid on the image; a patch query is marked with a red box."""
    n, L = attention.shape[:2]
    size = tuple(images.shape[-2:])
    fig = _figure(1.1 * (L + 1), 1.15 * n + 0.3, dpi=IMAGE_DPI)
    for i in range(n):
        ax = fig.add_subplot(n, L + 1, i * (L + 1) + 1)
        ax.imshow(_hwc(images[i]), interpolation="bilinear")
        _mark(ax, query_rc, patch_hw)
        ax.set_axis_off()
        if i == 0:
            ax.set_title("input", fontsize=7)
        up = _upsample(attention[i], size)  # L, H, W
        for j in range(L):
            ax = fig.add_subplot(n, L + 1, i * (L + 1) + j + 2)
            ax.imshow(_hwc(images[i]), interpolation="bilinear")
            ax.imshow(up[j].numpy(), cmap="inferno", alpha=0.65, interpolation="bilinear")
            _mark(ax, query_rc, patch_hw)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(f"layer {layers[j] + 1}", fontsize=7)
    fig.suptitle(f"Attention of {query_label} to the patches ({head_label})", fontsize=9)
    return _save(fig, path, palette=True)


def _mark(ax: Any, query_rc: tuple[int, int] | None, patch_hw: tuple[int, int] | None) -> None:
    if query_rc is None or patch_hw is None:
        return
    from matplotlib.patches import Rectangle

    r, c = query_rc
    ph, pw = patch_hw
    ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="red", linewidth=1.0))
