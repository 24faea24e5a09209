"""Transfer as the paper does it (Sec. 3.2, 4.1): pre-train on a source dataset, fine-tune on a target dataset with
a fresh zero head, possibly at a higher resolution, against training on the target from scratch; and few-shot
linear evaluation of the pre-trained features on the target (Sec. 4.1 "Metrics", Appendix B.1.1).

The chain goes through the files a user has: the pre-training run's ``model.safetensors`` is converted to the
official ``.npz`` (``vitlab.save(..., format="npz")``), both are loaded back with ``image_size=`` and
``num_classes=`` and checked to give identical weights and features (:func:`check_chain`), and the fine-tunes start
from the ``.npz``.

Cells, after the pre-training on the source (``pretrain``): for each target size (nested class-balanced subsets of
the target's ``train/``, a number of images per class, up to the whole folder), three runs of the same number of
steps: ``finetune-paper`` (the paper's recipe, :data:`~vitlab.study.studies.FINETUNE_RECIPE`), ``finetune-small``
(the small-data recipe, :data:`~vitlab.study.studies.SMALL_DATA_RECIPE`) and ``scratch`` (the study's from-scratch
recipe). Steps grow with the subset (``epochs`` passes, between ``min_steps`` and ``max_steps``), so a large target
is not starved of steps; the test split is evaluated once at the end of each run (no selection on it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vitlab.study.runner import Cell, cell_costs, fit_budget, load_or_make_plan, parse_model_spec, recipe_request, \
    run_cells
from vitlab.study.studies import (
    FINETUNE_RECIPE,
    SMALL_DATA_RECIPE,
    base_config,
    cell_config,
    count_images,
    finish,
    proportional_steps,
)

log = logging.getLogger(__name__)

METHODS = ("finetune-paper", "finetune-small", "scratch")
METHOD_NAMES = {"finetune-paper": "fine-tune, paper recipe", "finetune-small": "fine-tune, small-data recipe",
                "scratch": "from scratch"}
PRETRAINED_NPZ = "pretrained.npz"


def split_by_class(data_dir: str | Path, source_classes: list[str], target_classes: list[str],
                   out_dir: str | Path) -> tuple[Path, Path]:
    """Two ImageFolder roots of links, ``out_dir/source`` and ``out_dir/target``, holding the named classes of one
    folder (e.g. CIFAR-10's six animals and four vehicles); the two lists must not share a class."""
    from vitlab.study.subsets import class_split

    shared = sorted(set(source_classes) & set(target_classes))
    if shared:
        raise ValueError(f"classes {shared} are in both --source-classes and --target-classes; transfer needs "
                         f"disjoint classes")
    out_dir = Path(out_dir)
    return (class_split(data_dir, source_classes, out_dir / "source"),
            class_split(data_dir, target_classes, out_dir / "target"))


def check_transfer_model(spec: str, image_sizes: list[int]) -> Any:
    """The ViT config of ``spec``; refuses (one line) what the official ``.npz`` cannot carry exactly or a
    resolution that is not a multiple of the patch."""
    from vitlab.model import ViTConfig, config_from_name

    name, overrides = parse_model_spec(spec)
    cfg = config_from_name(name, **overrides)
    if not isinstance(cfg, ViTConfig):
        raise ValueError(f"--model {spec!r}: the transfer chain goes through the official .npz, which holds Vision "
                         f"Transformers; {name} is not one")
    if cfg.pos_embed not in ("learned-1d", "none"):
        raise ValueError(f"--model {spec!r}: the official .npz holds a learned 1D position embedding, not "
                         f"pos_embed={cfg.pos_embed!r}")
    if cfg.gelu != "tanh" or cfg.norm_eps != 1e-6:
        raise ValueError(f"--model {spec!r}: the official .npz is computed with tanh GELU and LayerNorm eps 1e-6; "
                         f"this model has gelu={cfg.gelu!r}, norm_eps={cfg.norm_eps:g}")
    patch = cfg.effective_patch_hw[0]
    bad = [s for s in image_sizes if s < 1 or s % patch]
    if bad:
        raise ValueError(f"resolution {bad[0]} px is not a multiple of the model's {patch}-px patch")
    return cfg


def check_head(data_dir: Path, num_classes: int, setting: int | None, what: str) -> None:
    """Refuse (one line) a dataset whose classes the head cannot take: fewer than two, or more than a fixed
    ``num_classes`` setting."""
    if num_classes < 2:
        raise ValueError(f"{what} {data_dir} has {num_classes} class; a classifier needs at least 2")
    if setting is not None and setting < num_classes:
        raise ValueError(f"{what} {data_dir} has {num_classes} classes but num_classes={setting} gives the head only "
                         f"{setting} outputs")


def check_chain(pretrained: str | Path, npz: str | Path, *, image_size: int, num_classes: int,
                images: torch.Tensor) -> dict[str, Any]:
    """Load the pre-trained ``model.safetensors`` and its ``.npz`` conversion at ``image_size`` with a fresh
    ``num_classes`` head (as a fine-tune does) and compare weights and features on ``images`` (B, 3, H, W)."""
    import vitlab

    a = vitlab.load(pretrained, image_size=image_size, num_classes=num_classes).eval()
    b = vitlab.load(npz, image_size=image_size, num_classes=num_classes).eval()
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        raise RuntimeError(f"{npz} loads with other parameters than {pretrained}: "
                           f"{sorted(set(sa) ^ set(sb))}")
    weight_diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    with torch.no_grad():
        fa = a.forward_head(a.forward_features(images), pre_logits=True)
        fb = b.forward_head(b.forward_features(images), pre_logits=True)
    feature_diff = float((fa - fb).abs().max())
    return {"image_size": image_size, "num_classes": num_classes, "same_config": a.config == b.config,
            "max_abs_weight_diff": weight_diff, "max_abs_feature_diff": feature_diff, "num_images": len(images),
            "identical": weight_diff == 0.0 and feature_diff == 0.0 and a.config == b.config}


def _sample_images(data_dir: Path, image_size: int, normalize: str, n: int = 16) -> torch.Tensor:
    from vitlab.data.folder import scan, split_dirs
    from vitlab.data.images import load_rgb
    from vitlab.data.transforms import eval_transform

    _, test_dir = split_dirs(data_dir)
    samples, _ = scan(test_dir)
    transform = eval_transform(image_size, normalize)
    picked = samples[:: max(1, len(samples) // n)][:n]
    return torch.stack([transform(load_rgb(path, max_side=image_size)) for path, _ in picked])


def transfer(source: str | Path, target: str | Path, out_dir: str | Path, *, model: str,
             per_class: list[int | None], pretrain_steps: int | None = None, target_epochs: float | None = None,
             budget_minutes: float | None = None, pretrain_share: float = 0.4, finetune_size: int | None = None,
             shots: list[int] | None = None, draws: int = 5, l2s: list[float] | None = None,
             finetune_lr: float | None = None, min_steps: int = 50, max_steps: int | None = None,
             recipe: str | None = None, sets: list[str] | None = None, subset_seed: int = 0,
             progress: bool | None = None) -> dict[str, Any]:
    """Pre-train ``model`` on ``source``, then fine-tune on nested subsets of ``target`` (``per_class`` images per
    class; ``None``: the whole folder) with two recipes, against training from scratch for the same steps; few-shot
    linear accuracy of the pre-trained features on the target.

    Steps: ``pretrain_steps`` and ``target_epochs`` (passes over each target subset), or ``budget_minutes``
    (``pretrain_share`` of it for pre-training unless ``pretrain_steps`` is given).
    """
    from vitlab.data.transforms import resolve_normalize
    from vitlab.study.subsets import materialise_per_class

    source, target, out_dir = Path(source).resolve(), Path(target).resolve(), Path(out_dir)
    shots = sorted(set(shots or [1, 5, 10, 25]))
    l2s = l2s or [1.0]
    base = base_config(recipe, sets)
    paper = base_config(recipe, sets, extra={**FINETUNE_RECIPE, **({"lr": finetune_lr} if finetune_lr else {})})
    small = base_config(recipe, sets, extra=SMALL_DATA_RECIPE)
    size = int(base.image_size)
    ft_size = int(finetune_size or size)
    cfg = check_transfer_model(model, [size, ft_size])
    if ft_size < size:
        raise ValueError(f"--finetune-size {ft_size} is below the pre-training resolution {size} px")
    if budget_minutes is None and (pretrain_steps is None or target_epochs is None):
        raise ValueError("give --pretrain-steps and --target-epochs, or --budget-minutes")
    if not 0.0 < pretrain_share < 1.0:
        raise ValueError(f"--pretrain-share must be in (0, 1), got {pretrain_share}")
    if any(k < 1 for k in shots) or draws < 1:
        raise ValueError(f"shots and draws must be positive, got shots {shots}, draws {draws}")
    src_train, src_test, src_classes = count_images(source)
    tgt_train, tgt_test, tgt_classes = count_images(target)
    check_head(source, src_classes, base.num_classes, "source")
    check_head(target, tgt_classes, base.num_classes, "target")
    name, overrides = parse_model_spec(model)
    ft_overrides = {k: v for k, v in overrides.items() if k != "representation_size"}  # the pre-logits is dropped
    sizes = sorted(set(per_class), key=lambda k: (k is None, k or 0))
    out_dir.mkdir(parents=True, exist_ok=True)
    subsets = materialise_per_class(target, sizes, out_dir / "subsets", seed=subset_seed)
    request = {"study": "transfer", "source": str(source), "target": str(target), "model": model,
               "per_class": sizes, "pretrain_steps": pretrain_steps, "target_epochs": target_epochs,
               "budget_minutes": budget_minutes, "pretrain_share": pretrain_share, "finetune_size": ft_size,
               "shots": shots, "draws": draws, "l2s": l2s, "min_steps": min_steps, "max_steps": max_steps,
               "subset_seed": subset_seed, "recipe": recipe_request(base), "paper_recipe": recipe_request(paper),
               "small_data_recipe": recipe_request(small)}
    pre_dir = out_dir / "cells" / "pretrain"
    npz = out_dir / PRETRAINED_NPZ

    def batch(k: int | None) -> int:
        return min(base.batch_size, subsets[k].num_images)

    def size_steps(epochs: float) -> list[int]:
        return [proportional_steps(subsets[k].num_images, batch(k), epochs, min_steps, max_steps) for k in sizes]

    def target_steps(epochs: float) -> list[int]:
        """Steps of every target cell, in the order of :func:`target_cells` (the methods of a size share them)."""
        return [n for n in size_steps(epochs) for _ in METHODS]

    def pretrain_cell(n: int) -> Cell:
        return Cell(key="pretrain", label={"kind": "pretrain"}, config=cell_config(base, model, n),
                    data_dir=source, num_train=src_train, num_test=src_test,
                    info={"image_size": size, "num_classes": src_classes})

    def target_cells(epochs: float) -> list[Cell]:
        cells = []
        for k, n in zip(sizes, size_steps(epochs)):
            sub = subsets[k]
            for method, recipe_config in zip(METHODS, (paper, small, base)):
                config = cell_config(recipe_config, model, n).replace(image_size=ft_size, batch_size=batch(k))
                if method != "scratch":
                    config = config.replace(init=str(npz.resolve()), model=name, model_overrides=ft_overrides)
                cells.append(Cell(key=f"per_class_{'all' if k is None else k}__{method}",
                                  label={"kind": method, "per_class": k}, config=config, data_dir=sub.root,
                                  num_train=sub.num_images, num_test=tgt_test,
                                  info={"per_class": sub.per_class, "subset_digest": sub.digest,
                                        "image_size": ft_size, "num_classes": tgt_classes}))
        return cells

    def make() -> dict[str, Any]:
        if budget_minutes is None:
            return {"pretrain_steps": int(pretrain_steps), "target_epochs": float(target_epochs)}
        pre_costs = cell_costs([pretrain_cell(100)], src_classes)
        tgt_costs = cell_costs(target_cells(1.0), tgt_classes, known=pre_costs)
        # Few-shot: features of the target's test split and of the drawn shots, twice (pre-trained, random init).
        shot_images = min(tgt_train, tgt_classes * max(shots) * draws)
        fewshot_s = 2 * (tgt_test + shot_images) * (pre_costs.decode + pre_costs.forward[0])
        budget = budget_minutes * 60.0
        if pretrain_steps is not None:
            n_pre = int(pretrain_steps)
        elif target_epochs is not None:
            left = budget - fewshot_s - sum(tgt_costs.fixed) - sum(
                t * n for t, n in zip(tgt_costs.per_step, target_steps(target_epochs)))
            n_pre = max(1, round(fit_budget(pre_costs, lambda x: [round(x)], left / 60.0)))
        else:
            n_pre = max(1, round(fit_budget(pre_costs, lambda x: [round(x)], pretrain_share * budget_minutes)))
        pre_s = pre_costs.fixed[0] + pre_costs.per_step[0] * n_pre
        epochs = float(target_epochs) if target_epochs is not None else fit_budget(
            tgt_costs, target_steps, (budget - pre_s - fewshot_s) / 60.0)
        seconds = pre_s + fewshot_s + sum(tgt_costs.fixed) + sum(
            t * n for t, n in zip(tgt_costs.per_step, target_steps(epochs)))
        return {"pretrain_steps": n_pre, "target_epochs": epochs, "budget_minutes": budget_minutes,
                "probe_seconds_per_step": tgt_costs.probes,
                "probe_decode_seconds_per_image": pre_costs.decode, "estimated_minutes": round(seconds / 60.0, 2)}

    plan = load_or_make_plan(out_dir, request, make)
    cells = [pretrain_cell(plan["pretrain_steps"]), *target_cells(plan["target_epochs"])]
    plan["num_cells"] = len(cells)
    plan["steps"] = {c.key: c.config.steps for c in cells}

    def convert() -> None:
        """The pre-trained model in the official layout (rewritten if missing: the fine-tunes start from it)."""
        import vitlab

        if not npz.is_file():
            vitlab.save(vitlab.load(pre_dir / "model.safetensors"), npz, format="npz")

    def before(cell: Cell) -> None:
        if cell.config.init:
            convert()

    def after(cell: Cell, run_dir: Path) -> dict[str, Any]:
        if cell.key != "pretrain":
            return {}
        import vitlab
        from vitlab.study.fewshot import fewshot_evaluate
        from vitlab.train.engine import build_model

        convert()
        normalize = resolve_normalize(base.normalize)
        chain = check_chain(run_dir / "model.safetensors", npz, image_size=ft_size, num_classes=tgt_classes,
                            images=_sample_images(target, ft_size, normalize))
        if not chain["identical"]:
            raise RuntimeError(f"{npz} does not reproduce {run_dir / 'model.safetensors'}: {chain}")
        log.info("chain: model.safetensors and %s load identically at %d px with %d classes", npz.name, ft_size,
                 tgt_classes)
        threads = torch.get_num_threads()
        if cell.config.threads:
            torch.set_num_threads(cell.config.threads)
        try:
            kwargs = dict(draws=draws, l2s=l2s, seed=subset_seed, normalize=normalize, precision=cell.config.precision,
                          progress=bool(progress))
            pretrained = fewshot_evaluate(vitlab.load(npz), target, shots, **kwargs)
            torch.manual_seed(cell.config.seed)  # the pre-training's initial weights
            random_init = fewshot_evaluate(build_model(cell.config, src_classes), target, shots, **kwargs)
        finally:
            torch.set_num_threads(threads)
        return {"chain": chain, "fewshot": pretrained, "fewshot_random_init": random_init}

    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        from vitlab.study.plots import plot_transfer

        verdict = compare(results)
        table = transfer_table(results, shots) + ("\n" + verdict["text"] + "\n" if verdict["text"] else "")
        return finish(out_dir, "transfer", plan, results, table, plot_transfer, verdict=verdict)

    return summarise(run_cells(cells, out_dir, study="transfer", before=before, after=after, progress=progress,
                               on_result=summarise))


def transfer_table(results: list[dict[str, Any]], shots: list[int]) -> str:
    """The Markdown tables: pre-training and the chain, few-shot accuracy, and target accuracy per size."""
    pre = next((r for r in results if r["key"] == "pretrain"), None)
    lines = []
    if pre is not None:
        chain = pre["chain"]
        lines += [f"Pre-training on the source: {pre['steps']} steps, test top-1 {pre['top1']:.2f}% "
                  f"({pre['num_train']} images). Chain: model.safetensors and {PRETRAINED_NPZ} loaded at "
                  f"{chain['image_size']} px with a {chain['num_classes']}-class head: "
                  + ("identical weights and features." if chain["identical"] else "DIFFERENT."), "",
                  "| few-shot linear (target) | " + " | ".join(f"{k}-shot" for k in shots) + " |",
                  "|---|" + "---:|" * len(shots)]
        for name, key in (("pre-trained features", "fewshot"), ("random-init features", "fewshot_random_init")):
            row = pre[key]["shots"]
            lines.append(f"| {name} | " + " | ".join(f"{row[str(k)]['mean']:.1f} ± {row[str(k)]['std']:.1f}"
                                                     for k in shots) + " |")
        lines.append("")
    rows: dict[Any, dict[str, Any]] = {}
    for r in results:
        if r["key"] != "pretrain":
            rows.setdefault(r["label"]["per_class"], {})[r["label"]["kind"]] = r
    lines += ["| images per class | training images | steps | " + " | ".join(METHOD_NAMES[m] + " %" for m in METHODS)
              + " |", "|---:|---:|---:|" + "---:|" * len(METHODS)]
    for k in sorted(rows, key=lambda k: (k is None, k or 0)):
        row = rows[k]
        any_cell = next(iter(row.values()))
        cols = [f"{row[m]['top1']:.2f}" if m in row else "-" for m in METHODS]
        lines.append(f"| {'all' if k is None else k} ({any_cell['info']['per_class']}) | {any_cell['num_train']} | "
                     f"{any_cell['steps']} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Which fine-tuning recipe did better, and from which target size on training from scratch caught up."""
    rows: dict[Any, dict[str, float]] = {}
    for r in results:
        if r["key"] != "pretrain":
            rows.setdefault(r["label"]["per_class"], {})[r["label"]["kind"]] = r["top1"]
    full = {k: v for k, v in rows.items() if all(m in v for m in METHODS)}
    if not full:
        return {"text": "", "sizes": 0}
    order = sorted(full, key=lambda k: (k is None, k or 0))
    diffs = [full[k]["finetune-paper"] - full[k]["finetune-small"] for k in order]
    wins = sum(d > 0 for d in diffs)
    mean = sum(diffs) / len(diffs)
    better = "paper" if mean > 0 else "small-data" if mean < 0 else "neither"
    gains = {("all" if k is None else k): max(full[k]["finetune-paper"], full[k]["finetune-small"])
             - full[k]["scratch"] for k in order}
    caught = next((k for k, g in gains.items() if g <= 0), None)
    verdict = "the two recipes did equally well" if better == "neither" else f"the {better} recipe is better"
    text = (f"Fine-tuning recipe: {verdict} (paper ahead at {wins} of {len(order)} sizes, "
            f"mean paper - small-data {mean:+.2f} points). Best fine-tune - scratch: "
            + ", ".join(f"{k}/class {g:+.2f}" for k, g in gains.items()) + ". "
            + (f"From scratch catches up at {caught} images per class." if caught is not None else
               "Pre-training helps at every size measured."))
    return {"text": text, "better_recipe": better, "paper_wins": wins, "sizes": len(order),
            "mean_paper_minus_small": mean, "gain_over_scratch": gains,
            "scratch_catches_up_at": caught}
