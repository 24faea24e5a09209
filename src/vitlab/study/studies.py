"""The paper's findings as studies on the user's data, each a grid of training runs by the same engine:

- :func:`data_size` -- Sec. 4.2, Fig. 3/4: ViT against a BiT ResNet as the training set grows (nested
  class-balanced subsets, the same images for every model, evaluation on the full test split). As the paper ran
  it, each subset trains for steps in proportion to its size, with early stopping on a validation split carved
  from the training images; or, as before, every cell for the same number of steps.
- :func:`patch_size` -- Sec. 4.1/4.4: the same width and depth at smaller patches, i.e. longer sequences, against
  sequence length and forward FLOPs per image.
- :func:`pos_embed` -- Appendix D.4, Table 8: no position embedding, learned 1D, learned 2D, fixed sin-cos 2D, with
  the learned embedding's topology score (Spearman correlation of cosine similarity with 2D grid distance, Fig. 7).
- :func:`vitlab.study.resolution.resolution` and :func:`vitlab.study.transfer.transfer` -- Sec. 3.2 and 4.1:
  pre-training, then fine-tuning at a higher resolution or on another dataset (their own modules).

Steps are set directly or from ``budget_minutes``. Each study writes ``<out>/<study>.json``, a Markdown table and a
PNG plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vitlab.study.runner import (
    Cell,
    cell_costs,
    fit_budget,
    load_or_make_plan,
    model_slug,
    parse_model_spec,
    recipe_request,
    run_cells,
    steps_for_budget,
)
from vitlab.io import atomic_write
from vitlab.train.config import TrainConfig, load_config

log = logging.getLogger(__name__)

# The recipe of every cell without --config: a plain from-scratch recipe for CIFAR-sized images, written out
# here (not taken from a preset) so a study's meaning does not change when a preset is retuned. A cell trains for a
# few hundred steps, where RandAugment and Inception crops slow learning more than they regularise: the CIFAR
# pad-and-crop and flips remain. A batch of 64 gives twice the updates of 128 for the same images; no
# torch.compile, whose compilation per model would cost more than a short cell saves. The precision is the
# engine's default.
STUDY_RECIPE: dict[str, Any] = {
    "image_size": 32, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "schedule": "cosine",
    "min_lr": 1e-5, "grad_clip": 1.0, "label_smoothing": 0.1, "crop": "pad", "crop_pad": 4, "hflip": True,
    "randaugment_n": 0, "mixup": 0.0, "cutmix": 0.0, "compile": False, "budget_minutes": None,
}

# The paper's fine-tuning recipe (Sec. 3.2, 4.1, Appendix B.1.1; the paper-finetune preset) at study scale: SGD with
# momentum 0.9, no weight decay, cosine decay after a short warm-up, gradient clipping at global norm 1, no label
# smoothing, a fresh zero head. lr 0.01 is the middle of the paper's sweep {0.001, 0.003, 0.01, 0.03}. The
# augmentation stays the study's (pad-and-crop, flips): Inception crops of 32-px images remove most of the object.
FINETUNE_RECIPE: dict[str, Any] = {
    "optimizer": "sgd", "momentum": 0.9, "lr": 0.01, "weight_decay": 0.0, "schedule": "cosine", "min_lr": 0.0,
    "grad_clip": 1.0, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "randaugment_n": 0,
}

# The small-data recipe (the optimisation and regularisation of the small-scratch preset, which trains a ViT from
# scratch on 10k images): AdamW lr 1e-3 with weight decay 0.1, label smoothing, mixup/cutmix on half the batches,
# one RandAugment op per image. The transfer study fine-tunes with it too and reports which recipe wins.
SMALL_DATA_RECIPE: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1, "schedule": "cosine", "min_lr": 1e-5, "grad_clip": 1.0,
    "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "mix_prob": 0.5, "randaugment_n": 1, "randaugment_m": 9,
    "randaugment_group": 16,
}

# The models of the published results (docs/study.md): a 4-layer, width-128 ViT with patch 4 (64 tokens at 32 px)
# and a BiT ResNet-26 at half width; both train at a few hundred milliseconds per step of 64 on 2 CPU cores.
DEFAULT_VIT = "ViT-Ti/16:patch_size=4:width=128:num_heads=2:depth=4:mlp_dim=256:classifier=gap"
DEFAULT_RESNET = "ResNet-26:width_factor=0.5:num_groups=16"


def base_config(recipe: str | None = None, sets: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> TrainConfig:
    """The training recipe every cell starts from: a preset or config file plus ``--set`` overrides (without a
    recipe: :data:`STUDY_RECIPE`; ``extra``, e.g. :data:`FINETUNE_RECIPE`, comes between the recipe and the
    overrides, so ``--set`` always wins); the study then sets the model, the steps and (unless given) a 5% warm-up,
    evaluates only at the end and ignores a wall-clock ``budget_minutes`` (cells train for a number of steps)."""
    extra_sets = [f"{key}={json.dumps(value)}" for key, value in (extra or {}).items()]  # JSON values are YAML
    if recipe is None:
        study = [f"{key}={json.dumps(value)}" for key, value in STUDY_RECIPE.items()]
        return load_config(None, study + extra_sets + list(sets or []))
    return load_config(recipe, extra_sets + list(sets or []))


def cell_config(base: TrainConfig, spec: str, steps: int, **model_changes: Any) -> TrainConfig:
    name, overrides = parse_model_spec(spec)
    overrides = {**overrides, **model_changes}
    warmup = base.warmup_steps if base.warmup_steps is not None else max(1, round(0.05 * steps))
    return base.replace(model=name, model_overrides=overrides, steps=steps, warmup_steps=warmup, eval_every=0.0,
                        budget_minutes=None)


def count_images(data_dir: Path) -> tuple[int, int, int]:
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


def finish(out_dir: Path, study: str, plan: dict[str, Any], results: list[dict[str, Any]], table: str,
           plot: Any, **extra: Any) -> dict[str, Any]:
    """Write ``OUT/<study>.json`` (plan, cells without their configs, ``extra``), ``.md`` (the table) and the plot
    (``plot(results, path)``); returns the summary with the table."""
    summary = {"study": study, "plan": plan, "cells": [{k: v for k, v in r.items() if k != "config"} for r in results],
               "complete": len(results) == plan.get("num_cells", len(results)),
               "minutes": round(sum(r.get("wall_seconds") or 0.0 for r in results) / 60.0, 2), **extra}
    atomic_write(out_dir / f"{study}.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    atomic_write(out_dir / f"{study}.md", lambda tmp: Path(tmp).write_text(table))
    if results:
        plot(results, out_dir / f"{study}.png")
    summary["table"] = table
    return summary


def proportional_steps(num_images: int, batch_size: int, epochs: float, min_steps: int,
                       max_steps: int | None) -> int:
    """Steps for ``epochs`` passes over ``num_images``, at least ``min_steps`` and at most ``max_steps``: the
    paper's rule of training each dataset for a number of epochs rather than a fixed number of steps."""
    steps = max(min_steps, round(epochs * num_images / batch_size))
    return min(steps, max_steps) if max_steps else steps


def test_at_best(cell: Cell, run_dir: Path) -> dict[str, Any]:
    """Early stopping's report: the weights of the best validation evaluation (``best.safetensors``) evaluated
    once on the test split; the record's ``top1`` becomes that test accuracy."""
    import vitlab
    from vitlab.data.transforms import resolve_normalize
    from vitlab.train.evaluate import evaluate

    best = json.loads((run_dir / "best.json").read_text())
    model = vitlab.load(run_dir / "best.safetensors")
    cfg = cell.config
    test = evaluate(model, cell.data_dir / "test", image_size=cfg.image_size,
                    normalize=resolve_normalize(cfg.normalize), batch_size=cfg.eval_batch_size, workers=cfg.workers,
                    classes=model.labels, precision=cfg.precision)
    return {"top1": test["top1"], "top5": test["top5"], "test_loss": test["loss"], "per_class": test["per_class"],
            "val_top1": best["top1"], "best_step": best["step"], "best_epoch": best["epoch"]}


# ---------------------------------------------------------------------------------------------- data size
STEPS_RULES = ("proportional", "same")


def data_size(data_dir: str | Path, out_dir: str | Path, *, models: list[str], fractions: list[float],
              steps: int | None = None, budget_minutes: float | None = None, recipe: str | None = None,
              sets: list[str] | None = None, subset_seed: int = 0, steps_rule: str = "proportional",
              epochs: float | None = None, val_fraction: float = 0.1, evaluations: int = 10,
              patience: int | None = None, min_steps: int = 50, max_steps: int | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """Train every model on every nested subset; accuracy on the full test split against training-set size.

    ``steps_rule="same"``: every cell trains ``steps`` steps (or the common count that fits ``budget_minutes``).
    ``steps_rule="proportional"`` (the paper, Sec. 4.2): a validation split (``val_fraction`` of every class) is
    carved from ``train/`` first, subsets are drawn from the rest, each cell trains ``epochs`` passes over its own
    subset (``min_steps`` to ``max_steps`` steps; with ``budget_minutes`` the epochs that fit), evaluates on the
    validation split ``evaluations`` times, keeps the best weights (and stops after ``patience`` evaluations
    without improvement, if given), and the test split is evaluated once, with those weights.
    """
    from vitlab.study.subsets import materialise_subsets

    if steps_rule not in STEPS_RULES:
        raise ValueError(f"steps rule must be one of {STEPS_RULES}, got {steps_rule!r}")
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    base = base_config(recipe, sets)
    fractions = sorted(set(fractions))
    for spec in models:
        parse_model_spec(spec)
    _, num_test, num_classes = count_images(data_dir)
    request = {"study": "data-size", "data": str(data_dir), "models": models, "fractions": fractions,
               "steps": steps, "budget_minutes": budget_minutes, "recipe": recipe_request(base),
               "subset_seed": subset_seed}
    proportional = steps_rule == "proportional"
    if proportional:
        if steps is not None:
            raise ValueError("--steps gives every cell the same steps; with the proportional rule give --epochs "
                             "(or --budget-minutes)")
        if epochs is None and budget_minutes is None:
            raise ValueError("the proportional rule needs --epochs or --budget-minutes")
        if evaluations < 1:
            raise ValueError(f"--evaluations must be positive, got {evaluations}")
        request.update(steps_rule=steps_rule, epochs=epochs, val_fraction=val_fraction, evaluations=evaluations,
                       patience=patience, min_steps=min_steps, max_steps=max_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    subsets = materialise_subsets(data_dir, fractions, out_dir / "subsets", seed=subset_seed,
                                  val_fraction=val_fraction if proportional else None)

    def cell(spec: str, f: float, config: TrainConfig) -> Cell:
        sub = subsets[f]
        info = {"subset_digest": sub.digest, "per_class": sub.per_class}
        if proportional:
            info.update(num_val=sub.num_val, val_digest=sub.val_digest)
        return Cell(key=f"{model_slug(spec)}__frac_{f:g}", label={"model": spec, "fraction": f}, config=config,
                    data_dir=sub.root, num_train=sub.num_images, num_test=num_test, info=info)

    def fixed_cells(n_steps: int) -> list[Cell]:
        # Smallest subsets first, models interleaved: a study cut short still compares the models on what it has.
        return [cell(spec, f, cell_config(base, spec, n_steps)) for f in fractions for spec in models]

    def steps_of(n_epochs: float) -> list[int]:
        return [proportional_steps(subsets[f].num_images, base.batch_size, n_epochs, min_steps, max_steps)
                for f in fractions for _ in models]

    def proportional_cells(n_epochs: float) -> list[Cell]:
        out = []
        for (f, spec), n in zip([(f, spec) for f in fractions for spec in models], steps_of(n_epochs)):
            spe = max(1, subsets[f].num_images // base.batch_size)
            interval = max(1, round(n / evaluations))  # steps between validation evaluations
            config = cell_config(base, spec, n).replace(eval_every=interval / spe, keep_best=True,
                                                        patience=patience)
            out.append(cell(spec, f, config))
        return out

    if proportional:
        def make() -> dict[str, Any]:
            if epochs is not None:
                return {"epochs": float(epochs)}
            probe_cells = proportional_cells(1.0)
            costs = cell_costs(probe_cells, num_classes, evaluations=[evaluations] * len(probe_cells))
            fitted = fit_budget(costs, steps_of, budget_minutes)
            seconds = sum(costs.fixed) + sum(t * n for t, n in zip(costs.per_step, steps_of(fitted)))
            return {"epochs": fitted, "budget_minutes": budget_minutes, **costs.record(),
                    "estimated_minutes": round(seconds / 60.0, 2)}

        plan = load_or_make_plan(out_dir, request, make)
        cells = proportional_cells(plan["epochs"])
        plan["steps"] = [c.config.steps for c in cells]
    else:
        plan = _plan(out_dir, request, fixed_cells, steps, budget_minutes, num_classes)
        cells = fixed_cells(plan["steps"])
    plan["num_cells"] = len(cells)

    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        from vitlab.study.plots import plot_data_size

        rows = sorted(results, key=lambda r: (models.index(r["label"]["model"]), r["label"]["fraction"]))
        if proportional:
            table = ["| model | fraction | training images | steps | epochs | best validation step | "
                     "validation top-1 % | test top-1 % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            table += [f"| {r['label']['model']} | {r['label']['fraction']:g} | {r['num_train']} | {r['steps']} | "
                      f"{r['epochs']:.1f} | {r['best_step']} | {r['val_top1']:.2f} | {r['top1']:.2f} |"
                      for r in rows]
        else:
            table = ["| model | fraction | training images | epochs | test top-1 % |", "|---|---:|---:|---:|---:|"]
            table += [f"| {r['label']['model']} | {r['label']['fraction']:g} | {r['num_train']} | "
                      f"{r['epochs']:.1f} | {r['top1']:.2f} |" for r in rows]
        return finish(out_dir, "data-size", plan, results, "\n".join(table) + "\n", plot_data_size)

    return summarise(run_cells(cells, out_dir, study="data-size", progress=progress, on_result=summarise,
                               after=test_at_best if proportional else None))


# --------------------------------------------------------------------------------------------- patch size
def patch_size(data_dir: str | Path, out_dir: str | Path, *, model: str, patch_sizes: list[int],
               steps: int | None = None, budget_minutes: float | None = None, recipe: str | None = None,
               sets: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """The same width and depth at each patch size: accuracy against sequence length and forward FLOPs."""
    from vitlab.model import ViTConfig, config_from_name

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    base = base_config(recipe, sets)
    name, overrides = parse_model_spec(model)
    num_train, num_test, num_classes = count_images(data_dir)
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
        return finish(out_dir, "patch-size", plan, results, "\n".join(table) + "\n", plot_patch_size)

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
    num_train, num_test, num_classes = count_images(data_dir)
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
        return finish(out_dir, "pos-embed", plan, results, "\n".join(table) + "\n", plot_pos_embed)

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
