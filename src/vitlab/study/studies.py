"""The paper's three findings as studies on the user's data, each a grid of training runs by the same engine:

- :func:`data_size` -- Sec. 4.2, Fig. 3/4: ViT against a BiT ResNet as the training set grows (nested
  class-balanced subsets, the same images for every model, evaluation on the full test split).
- :func:`patch_size` -- Sec. 4.1/4.4: the same width and depth at smaller patches, i.e. longer sequences, against
  sequence length and forward FLOPs per image.
- :func:`pos_embed` -- Appendix D.4, Table 8: no position embedding, learned 1D, learned 2D, fixed sin-cos 2D, with
  the learned embedding's topology score (Spearman correlation of cosine similarity with 2D grid distance, Fig. 7).

Every cell trains for the same number of optimisation steps (the paper compares models at fixed schedules), set
directly or from ``budget_minutes``. Each study writes ``<out>/<study>.json``, a Markdown table and a PNG plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vitlab.study.runner import (
    Cell,
    load_or_make_plan,
    model_slug,
    parse_model_spec,
    recipe_request,
    run_cells,
    steps_for_budget,
)
from vitlab.train.checkpoint import atomic_write
from vitlab.train.config import TrainConfig, load_config

log = logging.getLogger(__name__)

# The recipe of every cell without --config: a plain from-scratch recipe for CIFAR-sized images, written out
# here (not taken from a preset) so a study's meaning does not change when a preset is retuned. A cell trains for a
# few hundred steps, where RandAugment and Inception crops slow learning more than they regularise: the CIFAR
# pad-and-crop and flips remain. A batch of 64 gives twice the updates of 128 for the same images; no
# torch.compile, whose compilation per model would cost more than a short cell saves.
STUDY_RECIPE: dict[str, Any] = {
    "image_size": 32, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "schedule": "cosine",
    "min_lr": 1e-5, "grad_clip": 1.0, "label_smoothing": 0.1, "crop": "pad", "crop_pad": 4, "hflip": True,
    "randaugment_n": 0, "mixup": 0.0, "cutmix": 0.0, "precision": "bf16", "compile": False, "budget_minutes": None,
}

# The models of the published results (docs/study.md): a 4-layer, width-128 ViT with patch 4 (64 tokens at 32 px)
# and a BiT ResNet-26 at half width; both train at a few hundred milliseconds per step of 64 on 2 CPU cores.
DEFAULT_VIT = "ViT-Ti/16:patch_size=4:width=128:num_heads=2:depth=4:mlp_dim=256:classifier=gap"
DEFAULT_RESNET = "ResNet-26:width_factor=0.5:num_groups=16"


def base_config(recipe: str | None = None, sets: list[str] | None = None) -> TrainConfig:
    """The training recipe every cell starts from: a preset or config file plus ``--set`` overrides (without a
    recipe: :data:`STUDY_RECIPE`); the study then sets the model, the steps and (unless given) a 5% warm-up,
    evaluates only at the end and ignores a wall-clock ``budget_minutes`` (cells train for a number of steps)."""
    if recipe is None:
        study = [f"{key}={json.dumps(value)}" for key, value in STUDY_RECIPE.items()]  # JSON values are YAML
        return load_config(None, study + list(sets or []))
    return load_config(recipe, list(sets or []))


def cell_config(base: TrainConfig, spec: str, steps: int, **model_changes: Any) -> TrainConfig:
    name, overrides = parse_model_spec(spec)
    overrides = {**overrides, **model_changes}
    warmup = base.warmup_steps if base.warmup_steps is not None else max(1, round(0.05 * steps))
    return base.replace(model=name, model_overrides=overrides, steps=steps, warmup_steps=warmup, eval_every=0.0,
                        budget_minutes=None)


def _count(data_dir: Path) -> tuple[int, int, int]:
    """(train images, test images, classes) of an ImageFolder root."""
    from vitlab.data.folder import scan, split_dirs

    train_dir, test_dir = split_dirs(data_dir)
    if test_dir is None:
        raise FileNotFoundError(f"{data_dir}: a study evaluates on val/ or test/ next to train/; neither exists")
    train, classes = scan(train_dir)
    test, _ = scan(test_dir, classes)
    return len(train), len(test), len(classes)


def _plan(out_dir: Path, request: dict[str, Any], cells_for: Any, steps: int | None, budget_minutes: float | None,
          num_classes: int) -> dict[str, Any]:
    def make() -> dict[str, Any]:
        if budget_minutes is not None:
            return steps_for_budget(cells_for(100), budget_minutes, num_classes)
        return {"steps": int(steps)}

    if steps is None and budget_minutes is None:
        raise ValueError("give --steps or --budget-minutes")
    return load_or_make_plan(out_dir, request, make)


def _finish(out_dir: Path, study: str, plan: dict[str, Any], results: list[dict[str, Any]], table: str,
            plot: Any) -> dict[str, Any]:
    summary = {"study": study, "plan": plan, "cells": [{k: v for k, v in r.items() if k != "config"} for r in results],
               "complete": len(results) == plan.get("num_cells", len(results)),
               "minutes": round(sum(r.get("wall_seconds") or 0.0 for r in results) / 60.0, 2)}
    atomic_write(out_dir / f"{study}.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    atomic_write(out_dir / f"{study}.md", lambda tmp: Path(tmp).write_text(table))
    if results:
        plot(results, out_dir / f"{study}.png")
    summary["table"] = table
    return summary


# ---------------------------------------------------------------------------------------------- data size
def data_size(data_dir: str | Path, out_dir: str | Path, *, models: list[str], fractions: list[float],
              steps: int | None = None, budget_minutes: float | None = None, recipe: str | None = None,
              sets: list[str] | None = None, subset_seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Train every model on every nested subset; accuracy on the full test split against training-set size."""
    from vitlab.study.subsets import materialise_subsets

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    base = base_config(recipe, sets)
    fractions = sorted(set(fractions))
    for spec in models:
        parse_model_spec(spec)
    _, num_test, num_classes = _count(data_dir)
    request = {"study": "data-size", "data": str(data_dir), "models": models, "fractions": fractions,
               "steps": steps, "budget_minutes": budget_minutes, "recipe": recipe_request(base),
               "subset_seed": subset_seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    subsets = materialise_subsets(data_dir, fractions, out_dir / "subsets", seed=subset_seed)

    def cells_for(n_steps: int) -> list[Cell]:
        # Smallest subsets first, models interleaved: a study cut short still compares the models on what it has.
        return [Cell(key=f"{model_slug(spec)}__frac_{f:g}", label={"model": spec, "fraction": f},
                     config=cell_config(base, spec, n_steps), data_dir=subsets[f].root,
                     num_train=subsets[f].num_images, num_test=num_test,
                     info={"subset_digest": subsets[f].digest, "per_class": subsets[f].per_class})
                for f in fractions for spec in models]

    plan = _plan(out_dir, request, cells_for, steps, budget_minutes, num_classes)
    plan["num_cells"] = len(fractions) * len(models)

    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        from vitlab.study.plots import plot_data_size

        rows = sorted(results, key=lambda r: (models.index(r["label"]["model"]), r["label"]["fraction"]))
        table = ["| model | fraction | training images | epochs | test top-1 % |", "|---|---:|---:|---:|---:|"]
        table += [f"| {r['label']['model']} | {r['label']['fraction']:g} | {r['num_train']} | {r['epochs']:.1f} | "
                  f"{r['top1']:.2f} |" for r in rows]
        return _finish(out_dir, "data-size", plan, results, "\n".join(table) + "\n", plot_data_size)

    return summarise(run_cells(cells_for(plan["steps"]), out_dir, study="data-size", progress=progress,
                               on_result=summarise))


# --------------------------------------------------------------------------------------------- patch size
def patch_size(data_dir: str | Path, out_dir: str | Path, *, model: str, patch_sizes: list[int],
               steps: int | None = None, budget_minutes: float | None = None, recipe: str | None = None,
               sets: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """The same width and depth at each patch size: accuracy against sequence length and forward FLOPs."""
    from vitlab.model import ViTConfig, config_from_name

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    base = base_config(recipe, sets)
    name, overrides = parse_model_spec(model)
    num_train, num_test, num_classes = _count(data_dir)
    patch_sizes = sorted(set(patch_sizes), reverse=True)
    info = {}
    for p in patch_sizes:
        cfg = config_from_name(name, num_classes=num_classes, image_size=base.image_size,
                               **{**overrides, "patch_size": p})
        if not isinstance(cfg, ViTConfig):
            raise ValueError(f"the patch-size study needs a ViT, got {model!r}")
        info[p] = {"patch_size": p, "sequence_length": cfg.num_patches,
                   "tokens": cfg.num_patches + cfg.num_prefix_tokens, "gflops_per_image": _gflops(cfg)}
    request = {"study": "patch-size", "data": str(data_dir), "model": model, "patch_sizes": patch_sizes,
               "steps": steps, "budget_minutes": budget_minutes, "recipe": recipe_request(base)}

    def cells_for(n_steps: int) -> list[Cell]:
        return [Cell(key=f"{model_slug(model)}__patch{p}", label={"model": model, "patch_size": p},
                     config=cell_config(base, model, n_steps, patch_size=p), data_dir=data_dir,
                     num_train=num_train, num_test=num_test, info=info[p]) for p in patch_sizes]

    plan = _plan(out_dir, request, cells_for, steps, budget_minutes, num_classes)
    plan["num_cells"] = len(patch_sizes)

    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        from vitlab.study.plots import plot_patch_size

        table = ["| patch | sequence length | GFLOPs/image (forward) | test top-1 % | train img/s |",
                 "|---:|---:|---:|---:|---:|"]
        table += [f"| {r['info']['patch_size']} | {r['info']['sequence_length']} | "
                  f"{_fmt(r['info']['gflops_per_image'], '.4g')} | {r['top1']:.2f} | "
                  f"{_fmt(r['train_img_per_s'], '.0f')} |" for r in results]
        return _finish(out_dir, "patch-size", plan, results, "\n".join(table) + "\n", plot_patch_size)

    return summarise(run_cells(cells_for(plan["steps"]), out_dir, study="patch-size", progress=progress,
                               on_result=summarise))


def _gflops(cfg: Any) -> float | None:
    try:
        from vitlab.bench.flops import count_flops
    except ImportError:  # the benchmark module is optional for the study; the table then shows "-"
        log.warning("vitlab.bench.flops is not available; FLOPs are not reported")
        return None
    return count_flops(cfg) / 1e9


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------ position embedding
POS_EMBED_KINDS = ("none", "learned-1d", "learned-2d", "sincos-2d")


def pos_embed(data_dir: str | Path, out_dir: str | Path, *, model: str, kinds: list[str] | None = None,
              steps: int | None = None, budget_minutes: float | None = None, recipe: str | None = None,
              sets: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Appendix D.4: each position-embedding kind trained the same way; accuracy and the topology score."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    kinds = list(kinds or POS_EMBED_KINDS)
    bad = [k for k in kinds if k not in POS_EMBED_KINDS]
    if bad:
        raise ValueError(f"unknown position embedding(s) {bad}; choose from {POS_EMBED_KINDS}")
    base = base_config(recipe, sets)
    parse_model_spec(model)
    num_train, num_test, num_classes = _count(data_dir)
    request = {"study": "pos-embed", "data": str(data_dir), "model": model, "kinds": kinds, "steps": steps,
               "budget_minutes": budget_minutes, "recipe": recipe_request(base)}

    def cells_for(n_steps: int) -> list[Cell]:
        return [Cell(key=f"{model_slug(model)}__pos_{k}", label={"model": model, "pos_embed": k},
                     config=cell_config(base, model, n_steps, pos_embed=k), data_dir=data_dir,
                     num_train=num_train, num_test=num_test, info={"pos_embed": k, "num_classes": num_classes})
                for k in kinds]

    plan = _plan(out_dir, request, cells_for, steps, budget_minutes, num_classes)
    plan["num_cells"] = len(kinds)

    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        from vitlab.study.plots import plot_pos_embed

        table = ["| position embedding | test top-1 % | topology (Spearman) at init | after training |",
                 "|---|---:|---:|---:|"]
        table += [f"| {r['label']['pos_embed']} | {r['top1']:.2f} | {_fmt(r['topology_init'], '+.3f')} | "
                  f"{_fmt(r['topology'], '+.3f')} |" for r in results]
        return _finish(out_dir, "pos-embed", plan, results, "\n".join(table) + "\n", plot_pos_embed)

    return summarise(run_cells(cells_for(plan["steps"]), out_dir, study="pos-embed", after=_topology,
                               progress=progress, on_result=summarise))


def _topology(cell: Cell, run_dir: Path) -> dict[str, Any]:
    """Spearman correlation of position-embedding cosine similarity with grid distance, at initialisation (the
    same seed the run used) and after training; None without a position embedding."""
    import torch

    import vitlab
    from vitlab.analysis import pos_embed_topology
    from vitlab.train.engine import build_model

    if cell.label["pos_embed"] == "none":
        return {"topology": None, "topology_init": None}
    torch.manual_seed(cell.config.seed)  # what train() does before building the model
    initial = build_model(cell.config, cell.config.num_classes or cell.info["num_classes"])
    trained = vitlab.load(run_dir / "model.safetensors")
    detail = pos_embed_topology(trained)
    # The paper's Fig. 7 (centre) for this embedding, next to the study's own figure.
    from vitlab.analysis import pos_embed_similarity
    from vitlab.analysis.plots import plot_pos_embed_similarity

    figure = run_dir.parent.parent / f"pos-embed_{cell.label['pos_embed']}_similarity.png"
    plot_pos_embed_similarity(pos_embed_similarity(trained), figure, spearman=detail["spearman"])
    return {"topology_init": pos_embed_topology(initial)["spearman"], "topology": detail["spearman"],
            "topology_detail": detail, "similarity_figure": figure.name}
