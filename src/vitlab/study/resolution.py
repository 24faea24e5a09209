"""Pre-train at a low resolution, fine-tune at the same and at higher resolutions (paper Sec. 3.2, "Fine-tuning and
higher resolution"; Table 2 and Appendix B.1.1 fine-tune at 384 px what was pre-trained at 224 px).

The patch size stays, so a higher resolution means a longer sequence; the learned position embedding, one vector
per grid position of the pre-training resolution, then has to be extended to the larger grid. The paper
interpolates it in 2D "according to their location in the original image". The study compares, on one image
folder:

- ``pretrain_<p>px``: the model from scratch at ``p`` px (the study recipe), ``P`` steps;
- ``finetune_<s>px_interpolated``: the pre-trained ``model.safetensors`` loaded at ``s`` px (the position
  embedding resampled bilinearly, corners aligned, exactly as ``vitlab.load(image_size=)`` and the official code),
  then ``F`` steps of the paper's fine-tuning recipe with a fresh zero head; at ``s = p`` nothing is resampled;
- ``finetune_<s>px_not-interpolated`` (``s > p``): the same fine-tune, but the pre-trained table is not resampled:
  each learned vector stays at its grid position (row, column), the top-left ``p/patch`` x ``p/patch`` sub-grid of
  the new grid, and the new rows and columns start at zero (:func:`place_pos_embed`);
- ``scratch_<s>px`` (``s > p``): the model from scratch at ``s`` px for the same training compute as pre-training
  plus fine-tuning: ``round((P f_p + F f_s) / f_s)`` steps, with ``f`` the forward FLOPs per image
  (:func:`vitlab.bench.flops.count_flops`; training costs about three forwards per image at any resolution, so the
  factor cancels).

Why "not interpolated" keeps the grid positions: it is the only way to use the table without resampling that keeps
each vector on the patch it was learned for. Taking the first entries of the 1D table in order (the other literal
reading) would move every row after the first to another place in the image, testing a scrambled embedding rather
than a missing interpolation. Zeros for the new positions add nothing, where a random draw would add noise the
fine-tune must first undo; both are learned during fine-tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vitlab.study.runner import Cell, cell_costs, fit_budget, load_or_make_plan, parse_model_spec, recipe_request, \
    run_cells
from vitlab.study.studies import FINETUNE_RECIPE, base_config, cell_config, count_images, finish

log = logging.getLogger(__name__)

# Forward and backward of one image cost about three forward passes (FLOPs of the matrix products).
TRAINING_FLOPS_PER_FORWARD = 3


def place_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                    num_prefix_tokens: int = 0) -> torch.Tensor:
    """A (1, prefix + gh*gw, D) learned table on a larger (GH, GW) grid without resampling: position (r, c) keeps
    its vector, positions outside the old grid get zeros, prefix (class) slots are kept as they are."""
    gh, gw = old_grid
    big_h, big_w = new_grid
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != gh * gw:
        raise ValueError(f"old_grid={old_grid} holds {gh * gw} positions but the table has {grid.shape[1]}")
    if big_h < gh or big_w < gw:
        raise ValueError(f"the new grid {new_grid} is smaller than the old one {old_grid}")
    out = grid.new_zeros(1, big_h, big_w, grid.shape[-1])  # 1, GH, GW, D
    out[:, :gh, :gw] = grid.reshape(1, gh, gw, -1)
    return torch.cat([prefix, out.reshape(1, big_h * big_w, -1)], dim=1)  # 1, prefix + GH*GW, D


def not_interpolated_checkpoint(pretrained: str | Path, image_size: int, path: str | Path) -> Path:
    """Write the pre-trained model at ``image_size`` with its position table placed by :func:`place_pos_embed`
    (a vitlab checkpoint, what the ``not-interpolated`` fine-tunes start from)."""
    import vitlab
    from vitlab.model import VisionTransformer

    model = vitlab.load(pretrained)
    cfg = model.config
    large = VisionTransformer(cfg.replace(image_size=image_size))
    state = model.state_dict()
    state["pos_embed"] = place_pos_embed(state["pos_embed"], large.config.grid_size, cfg.grid_size,
                                         cfg.num_prefix_tokens)
    large.load_state_dict(state)
    return vitlab.save(large, path, labels=model.labels)


def check_resolution_model(spec: str, sizes: list[int], what: str = "--sizes") -> Any:
    """The ViT config of ``spec``; refuses (one line) a model without a learned 1D position embedding or a size that
    is not a multiple of its patch."""
    from vitlab.model import ViTConfig, config_from_name

    name, overrides = parse_model_spec(spec)
    cfg = config_from_name(name, **overrides)
    if not isinstance(cfg, ViTConfig):
        raise ValueError(f"--model {spec!r}: the study fine-tunes a Vision Transformer's position embedding; "
                         f"{name} has none")
    if cfg.pos_embed != "learned-1d":
        raise ValueError(f"--model {spec!r}: the study resizes the paper's learned 1D position embedding; this model "
                         f"has pos_embed={cfg.pos_embed!r}")
    patch = cfg.effective_patch_hw[0]
    bad = [s for s in sizes if s < 1 or s % patch]
    if bad:
        raise ValueError(f"{what}: {', '.join(f'{s} px' for s in bad)} not a multiple of the model's {patch}-px "
                         f"patch (e.g. {patch * max(1, bad[0] // patch)} or {patch * (max(1, bad[0] // patch) + 1)})")
    return cfg


def resolution(data_dir: str | Path, out_dir: str | Path, *, model: str, sizes: list[int],
               pretrain_size: int | None = None, pretrain_steps: int | None = None,
               finetune_steps: int | None = None, budget_minutes: float | None = None,
               finetune_ratio: float = 0.25, finetune_lr: float | None = None, recipe: str | None = None,
               sets: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Pre-train at ``pretrain_size`` (default: the recipe's ``image_size``), fine-tune at each of ``sizes`` with
    and without interpolating the position embedding, and train from scratch at each larger size for the same
    compute; test top-1 against training FLOPs.

    Steps: ``pretrain_steps`` and ``finetune_steps``, or ``budget_minutes`` (fine-tunes get ``finetune_ratio``
    times the pre-training steps unless ``finetune_steps`` is given).
    """
    from vitlab.bench.flops import count_flops

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    base = base_config(recipe, sets)
    ft_extra = {**FINETUNE_RECIPE, **({"lr": finetune_lr} if finetune_lr is not None else {})}
    ft_base = base_config(recipe, sets, extra=ft_extra)
    p = int(pretrain_size or base.image_size)
    sizes = sorted(set(int(s) for s in sizes))
    check_resolution_model(model, [p], "--pretrain-size")
    cfg = check_resolution_model(model, sizes)
    small = [s for s in sizes if s < p]
    if small:
        raise ValueError(f"--sizes: {small} below the pre-training resolution {p} px; the study fine-tunes at the "
                         f"same or higher resolutions")
    if budget_minutes is None and (pretrain_steps is None or finetune_steps is None):
        raise ValueError("give --pretrain-steps and --finetune-steps, or --budget-minutes")
    if not 0.0 < finetune_ratio:
        raise ValueError(f"--finetune-ratio must be positive, got {finetune_ratio}")
    num_train, num_test, num_classes = count_images(data_dir)
    if base.num_classes is not None and base.num_classes < num_classes:
        raise ValueError(f"{data_dir} has {num_classes} classes but num_classes={base.num_classes} gives the head "
                         f"only {base.num_classes} outputs")
    name, overrides = parse_model_spec(model)
    ft_overrides = {k: v for k, v in overrides.items() if k != "representation_size"}  # the pre-logits is dropped
    larger = [s for s in sizes if s > p]
    gflops = {s: count_flops(cfg.replace(image_size=s, num_classes=num_classes)) / 1e9 for s in {p, *sizes}}
    request = {"study": "resolution", "data": str(data_dir), "model": model, "sizes": sizes, "pretrain_size": p,
               "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "budget_minutes": budget_minutes,
               "finetune_ratio": finetune_ratio, "recipe": recipe_request(base),
               "finetune_recipe": recipe_request(ft_base)}
    pre_dir = out_dir / "cells" / f"pretrain_{p}px"
    inits = out_dir / "inits"

    def scratch_steps(n_pre: int, n_ft: int, s: int) -> int:
        return max(1, round((n_pre * gflops[p] + n_ft * gflops[s]) / gflops[s]))

    def info(s: int, start: str, pos: str, forward_gflops: float) -> dict[str, Any]:
        """What a cell is, and its training compute: ``forward_gflops`` summed over every image it (and the
        pre-training it starts from) trained on."""
        grid = s // cfg.effective_patch_hw[0]
        return {"image_size": s, "tokens": grid * grid + cfg.num_prefix_tokens, "start": start, "pos_embed": pos,
                "gflops_per_image": gflops[s], "num_classes": num_classes,
                "training_tflops": TRAINING_FLOPS_PER_FORWARD * forward_gflops / 1e3}

    def cells_for(n_pre: int, n_ft: int) -> list[Cell]:
        batch = base.batch_size
        pre_gf = n_pre * batch * gflops[p]
        cells = [Cell(key=f"pretrain_{p}px", label={"kind": "pretrain", "image_size": p},
                      config=cell_config(base, model, n_pre).replace(image_size=p), data_dir=data_dir,
                      num_train=num_train, num_test=num_test,
                      info=info(p, "scratch", "learned", pre_gf))]
        for s in sizes:
            variants = [("interpolated", pre_dir / "model.safetensors")]
            if s > p:
                variants.append(("not-interpolated", inits / f"not-interpolated_{s}px.safetensors"))
            for pos, init in variants:
                config = cell_config(ft_base, model, n_ft).replace(
                    init=str(init.resolve()), image_size=s, model=name, model_overrides=ft_overrides)
                cells.append(Cell(key=f"finetune_{s}px_{pos}", label={"kind": "finetune", "image_size": s,
                                                                      "pos_embed": pos},
                                  config=config, data_dir=data_dir, num_train=num_train, num_test=num_test,
                                  info=info(s, f"pre-trained at {p} px", pos if s > p else "unchanged",
                                            pre_gf + n_ft * ft_base.batch_size * gflops[s])))
        for s in larger:
            n = scratch_steps(n_pre, n_ft, s)
            cells.append(Cell(key=f"scratch_{s}px", label={"kind": "scratch", "image_size": s},
                              config=cell_config(base, model, n).replace(image_size=s), data_dir=data_dir,
                              num_train=num_train, num_test=num_test,
                              info=info(s, "scratch", "learned", n * batch * gflops[s])))
        return cells

    def make() -> dict[str, Any]:
        if budget_minutes is None:
            return {"pretrain_steps": int(pretrain_steps), "finetune_steps": int(finetune_steps)}
        probe = cells_for(100, 100)

        def ft_of(x: float) -> int:
            return int(finetune_steps) if finetune_steps is not None else max(1, round(finetune_ratio * x))

        def steps_of(x: float) -> list[int]:
            n_pre = int(pretrain_steps) if pretrain_steps is not None else max(1, round(x))
            n_ft = ft_of(n_pre)
            return [n_pre] + [n_ft for c in probe if c.label["kind"] == "finetune"] + \
                [scratch_steps(n_pre, n_ft, s) for s in larger]

        costs = cell_costs(probe, num_classes)
        x = fit_budget(costs, steps_of, budget_minutes)
        chosen = steps_of(x)
        seconds = sum(costs.fixed) + sum(t * n for t, n in zip(costs.per_step, chosen))
        return {"pretrain_steps": chosen[0], "finetune_steps": ft_of(chosen[0]), "budget_minutes": budget_minutes,
                **costs.record(), "estimated_minutes": round(seconds / 60.0, 2)}

    plan = load_or_make_plan(out_dir, request, make)
    cells = cells_for(plan["pretrain_steps"], plan["finetune_steps"])
    plan["num_cells"] = len(cells)
    plan["steps"] = {c.key: c.config.steps for c in cells}

    def before(cell: Cell) -> None:
        init = cell.config.init
        if init and cell.label.get("pos_embed") == "not-interpolated" and not Path(init).is_file():
            not_interpolated_checkpoint(pre_dir / "model.safetensors", cell.label["image_size"], init)

    def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
        from vitlab.study.plots import plot_resolution

        table = ["| cell | resolution | tokens | start | position embedding | steps | training TFLOPs | "
                 "test top-1 % |", "|---|---:|---:|---|---|---:|---:|---:|"]
        for r in results:
            i = r["info"]
            table.append(f"| {r['key']} | {i['image_size']} | {i['tokens']} | {i['start']} | {i['pos_embed']} | "
                         f"{r['steps']} | {i['training_tflops']:.3g} | {r['top1']:.2f} |")
        return finish(out_dir, "resolution", plan, results, "\n".join(table) + "\n", plot_resolution)

    return summarise(run_cells(cells, out_dir, study="resolution", before=before, progress=progress,
                               on_result=summarise))


def describe(summary: dict[str, Any]) -> str:
    """One line per larger size: what interpolation gained over keeping the table, and over training from scratch
    for the same compute."""
    by_key = {c["key"]: c for c in summary["cells"]}
    lines = []
    for key, cell in by_key.items():
        if not key.endswith("_interpolated") or "not-" in key:
            continue
        s = cell["info"]["image_size"]
        kept, scratch = by_key.get(f"finetune_{s}px_not-interpolated"), by_key.get(f"scratch_{s}px")
        if kept is None or scratch is None:
            continue
        lines.append(f"{s} px: interpolated {cell['top1']:.2f}%, not interpolated {kept['top1']:.2f}% "
                     f"({cell['top1'] - kept['top1']:+.2f}), from scratch for the same compute {scratch['top1']:.2f}% "
                     f"({cell['top1'] - scratch['top1']:+.2f})")
    return "\n".join(lines)

