"""Run all the paper's analyses of one model on a set of images and write each figure (PNG) and its numbers (JSON).

This is what ``vitlab inspect`` calls once it has a model and images. One pass of the explicit attention path
(``model.attention_maps``) per batch feeds the mean attention distance (Fig. 7 right), the attention rollout
(Fig. 6) and the raw attention maps of one query token; the weight analyses (Fig. 7 left and centre) need no
images. Every output file is written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.analysis.distance import attention_distance, model_patch_hw
from vitlab.analysis.filters import embedding_filters
from vitlab.analysis.posembed import pos_embed_similarity, pos_embed_topology
from vitlab.analysis.rollout import query_attention, rollout_maps
from vitlab.io import write_json

log = logging.getLogger(__name__)

QUERY_ROWS = 4  # images in the raw-attention figure (one column per layer makes it wide already)


def resolve_query(model: nn.Module, query: str | tuple[int, int] | None) -> tuple[int, tuple[int, int] | None, str]:
    """(token index, (row, col) or None, label) for a query given as ``"cls"``, ``"r,c"`` (0-based grid cell),
    a (row, col) tuple, or None (the class token if the model has one, else the centre patch)."""
    cfg = model.config
    gh, gw = cfg.grid_size
    p = cfg.num_prefix_tokens
    if query is None:
        query = "cls" if p else (gh // 2, gw // 2)
    if isinstance(query, str):
        if query.strip().lower() == "cls":
            if not p:
                raise ValueError("--query cls: this model has no class token (classifier='gap'); give a patch 'row,col'")
            return 0, None, "the class token"
        try:
            r, c = (int(v) for v in query.split(","))
        except ValueError:
            raise ValueError(f"--query must be 'cls' or 'row,col' (0-based grid cell), got {query!r}") from None
        query = (r, c)
    r, c = query
    if not (0 <= r < gh and 0 <= c < gw):
        raise ValueError(f"--query {r},{c} is outside the {gh}x{gw} patch grid (0-based row,col)")
    return p + r * gw + c, (r, c), f"patch (row {r}, col {c})"


def _rounded(t: torch.Tensor, digits: int = 5) -> Any:
    return torch.round(t.double(), decimals=digits).tolist()


@torch.inference_mode()
def inspect_model(
    model: nn.Module,
    images: torch.Tensor,
    display: torch.Tensor,
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    head: int | None = None,
    query: str | tuple[int, int] | None = None,
    k: int = 28,
    batch_size: int = 16,
    num_show: int = 8,
    progress: bool | None = None,
    meta: dict | None = None,
) -> dict:
    """Write ``filters``, ``pos_embed``, ``attention_distance``, ``rollout`` and ``query_attention`` figures
    (PNG) and numbers (JSON) plus ``summary.json`` under ``out_dir``; return the summary.

    ``images`` (B, C, H, W) is the normalised model input at the model's resolution, ``display`` the same images
    in [0, 1] for the figures. ``layers`` (0-based) and ``head`` (0-based, None = mean over heads) select what the
    raw-attention figure shows; ``query`` is described in :func:`resolve_query`. ``progress=None`` shows a
    progress bar only on a terminal.
    """
    from tqdm.auto import tqdm

    from vitlab.analysis import plots

    cfg = model.config
    out = Path(out_dir)
    model.eval()
    n = images.shape[0]
    if n == 0:
        raise ValueError("inspect_model: no images given")
    if tuple(images.shape[-2:]) != tuple(cfg.image_hw):
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the model expects {cfg.image_hw}; "
                         "resize the images or call model.set_image_size() first")
    depth, heads = cfg.depth, cfg.num_heads
    layers = list(range(depth)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < depth:
            raise ValueError(f"--layer {layer + 1} is outside 1..{depth} (the model has {depth} layers)")
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head {head + 1} is outside 1..{heads} (the model has {heads} heads)")
    q_index, q_rc, q_label = resolve_query(model, query)
    names = [f"image {i}" for i in range(n)] if names is None else list(names)
    num_show = min(num_show, n)
    # The shown images are spread over the set (like the selection of files), so a sorted ImageFolder does not
    # fill the figures with its first class; the raw-attention figure takes every other one of those.
    show = [i * n // num_show for i in range(num_show)]
    query_rows = show[:: max(1, num_show // QUERY_ROWS)][:QUERY_ROWS]
    grid, patch_hw, prefix = cfg.grid_size, model_patch_hw(model), cfg.num_prefix_tokens
    summary: dict[str, Any] = {"model": cfg.to_dict(), "images": n, "skipped": {}, **(meta or {})}
    out.mkdir(parents=True, exist_ok=True)  # only once the arguments are known to be valid
    start = time.perf_counter()
    written: list[str] = []  # this run's outputs (a reused --out may hold older files)

    # Weight analyses (no images needed).
    if cfg.backbone is None:
        pca = embedding_filters(model, k)
        plots.plot_filters(pca.components, pca.explained_variance, _record(written, out / "filters.png"))
        filt = {"k": int(pca.components.shape[0]), "explained_variance": _rounded(pca.explained_variance, 6),
                "cumulative": round(float(pca.explained_variance.sum()), 6)}
        write_json(_record(written, out / "filters.json"), filt)
        summary["filters"] = filt
    else:
        summary["skipped"]["filters"] = "hybrid model: the patch embedding acts on ResNet features, not RGB pixels"
    if cfg.pos_embed != "none":
        sim = pos_embed_similarity(model)
        topo = pos_embed_topology(model, sim)
        plots.plot_pos_embed_similarity(sim, _record(written, out / "pos_embed.png"), topo["spearman"])
        pos = {"pos_embed": cfg.pos_embed, "grid": list(grid), **topo}
        write_json(_record(written, out / "pos_embed.json"), pos)
        summary["pos_embed"] = pos
    else:
        summary["skipped"]["pos_embed"] = "the model has no position embedding"

    # Attention analyses: one explicit forward per batch.
    distances, rollouts, shown = [], [], []
    # disable=None lets tqdm show the bar only on a terminal.
    with tqdm(total=n, unit="img", desc="inspect", disable=None if progress is None else not progress) as bar:
        for lo in range(0, n, batch_size):
            x = images[lo:lo + batch_size]
            maps = model.attention_maps(x)  # depth x (b, H, T, T)
            distances.append(attention_distance(maps, grid, patch_hw, prefix))  # b, depth, H
            rollouts.append(rollout_maps(maps, grid, prefix))  # b, gh, gw
            sel = [i - lo for i in query_rows if lo <= i < lo + x.shape[0]]
            if sel:
                qa = query_attention([maps[i][sel] for i in layers], q_index, grid, prefix)  # s, L, H, gh, gw
                shown.append(qa.mean(dim=2) if head is None else qa[:, :, head])
            bar.update(x.shape[0])
    dist_per_image = torch.cat(distances)  # n, depth, H
    dist = dist_per_image.mean(dim=0)  # depth, H
    roll = torch.cat(rollouts)  # n, gh, gw
    qmaps = torch.cat(shown)  # len(query_rows), L, gh, gw

    uniform = _uniform_distance(grid, patch_hw)
    plots.plot_attention_distance(dist, _record(written, out / "attention_distance.png"), uniform,
                                  title=f"Mean attention distance ({n} images, {cfg.image_hw[0]}x{cfg.image_hw[1]} px)")
    dist_json = {
        "images": n, "image_size": list(cfg.image_hw), "patch_size_px": list(patch_hw),
        "pixels": _rounded(dist, 3),
        "per_layer_mean": _rounded(dist.mean(dim=1), 3),
        "per_layer_min": _rounded(dist.amin(dim=1), 3),
        "per_layer_max": _rounded(dist.amax(dim=1), 3),
        "uniform_attention_px": round(uniform, 3),
    }
    write_json(_record(written, out / "attention_distance.json"), dist_json)
    summary["attention_distance"] = dist_json

    predictions = _predictions(model, images[show])
    titles = [names[i] if predictions is None else f"{names[i]}\npred: {predictions[j]}" for j, i in enumerate(show)]
    plots.plot_rollout(display[show], roll[show], _record(written, out / "rollout.png"), titles=titles)
    peaks = roll.flatten(1).argmax(dim=1)
    roll_json = {
        "row": "class token" if prefix else "mean over tokens (GAP)",
        "mean_map": _rounded(roll.mean(dim=0)),
        "images": [{"file": names[i], "peak_patch": [int(peaks[i]) // grid[1], int(peaks[i]) % grid[1]],
                    **({} if predictions is None else {"prediction": predictions[j]}),
                    "map": _rounded(roll[i])} for j, i in enumerate(show)],
    }
    write_json(_record(written, out / "rollout.json"), roll_json)
    summary["rollout"] = {"row": roll_json["row"], "shown": num_show}

    head_label = "mean of heads" if head is None else f"head {head + 1}"
    plots.plot_query_attention(display[query_rows], qmaps, layers, _record(written, out / "query_attention.png"),
                               q_label, q_rc, head_label, patch_hw)
    q_json = {"query": q_label, "query_token": q_index, "head": head_label, "layers": [i + 1 for i in layers],
              "images": [{"file": names[i], "maps": _rounded(qmaps[j], 4)} for j, i in enumerate(query_rows)]}
    write_json(_record(written, out / "query_attention.json"), q_json)
    summary["query_attention"] = {k_: q_json[k_] for k_ in ("query", "head", "layers")}

    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["files"] = sorted(written)
    write_json(out / "summary.json", summary)
    log.info("inspect: wrote %d files to %s in %.1f s", len(summary["files"]) + 1, out, summary["seconds"])
    return summary


def _predictions(model: nn.Module, images: torch.Tensor) -> list[str] | None:
    """Predicted class names of the shown images, when the checkpoint carries its labels (``model.labels``)."""
    labels = getattr(model, "labels", None)
    if not labels or model.config.num_classes != len(labels):
        return None
    return [labels[int(i)] for i in model(images).argmax(dim=1)]


def _record(written: list[str], path: Path) -> Path:
    written.append(path.name)
    return path


def _uniform_distance(grid: tuple[int, int], patch_hw: tuple[int, int]) -> float:
    """Mean distance under uniform attention (all pairs of patch centres, self-pairs included): the ceiling a
    head reaches when it attends everywhere equally, for reading the figure."""
    from vitlab.analysis.distance import patch_distances

    return float(patch_distances(grid, patch_hw).mean())
