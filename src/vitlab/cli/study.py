"""``vitlab study {data-size,patch-size,pos-embed,resolution,transfer}``: the paper's findings reproduced on image
folders (see :mod:`vitlab.study`). Each command resumes where it stopped and prints its result table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The models of the published results; kept here as text so building the parser imports nothing heavy.
DEFAULT_VIT = "ViT-Ti/16:patch_size=4:width=128:num_heads=2:depth=4:mlp_dim=256:classifier=gap"
DEFAULT_RESNET = "ResNet-26:width_factor=0.5:num_groups=16"


def _per_class(text: str) -> list[int | None]:
    from vitlab.study.runner import split_list

    out: list[int | None] = []
    for item in split_list(text):
        if item == "all":
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise ValueError(f"--per-class: expected positive integers or 'all', got {item!r}")
    return out


def _transfer(args: argparse.Namespace, common: dict) -> dict:
    from vitlab.study import transfer
    from vitlab.study.runner import split_list

    if args.data is not None:
        if args.source or args.target:
            raise ValueError("give either --data with --source-classes/--target-classes, or --source and --target")
        if not (args.source_classes and args.target_classes):
            raise ValueError("--data needs --source-classes and --target-classes (comma-separated class folders)")
        source, target = transfer.split_by_class(args.data, split_list(args.source_classes),
                                                 split_list(args.target_classes), Path(args.out) / "data")
    elif args.source and args.target:
        source, target = args.source, args.target
    else:
        raise ValueError("give --source DIR and --target DIR (or --data DIR with --source-classes and "
                         "--target-classes)")
    return transfer.transfer(
        source, target, args.out, model=args.model, per_class=_per_class(args.per_class),
        pretrain_steps=args.pretrain_steps, target_epochs=args.target_epochs, pretrain_share=args.pretrain_share,
        finetune_size=args.finetune_size, shots=split_list(args.shots, int), draws=args.draws,
        l2s=split_list(args.l2, float), finetune_lr=args.finetune_lr, min_steps=args.min_steps,
        max_steps=args.max_steps, subset_seed=args.subset_seed, **common)


def run(args: argparse.Namespace) -> int:
    from vitlab.study import studies
    from vitlab.study.runner import split_list

    common = dict(budget_minutes=args.budget_minutes, recipe=args.config, sets=args.set)
    try:
        if args.study == "data-size":
            summary = studies.data_size(
                args.data, args.out, models=split_list(args.models), fractions=split_list(args.fractions, float),
                subset_seed=args.subset_seed, steps=args.steps, steps_rule=args.steps_rule, epochs=args.epochs,
                val_fraction=args.val_fraction, evaluations=args.evaluations, patience=args.patience,
                min_steps=args.min_steps, max_steps=args.max_steps, **common)
        elif args.study == "patch-size":
            summary = studies.patch_size(args.data, args.out, model=args.model, steps=args.steps,
                                         patch_sizes=split_list(args.patch_sizes, int), **common)
        elif args.study == "pos-embed":
            summary = studies.pos_embed(args.data, args.out, model=args.model, kinds=split_list(args.kinds),
                                        steps=args.steps, **common)
        elif args.study == "resolution":
            from vitlab.study import resolution

            summary = resolution.resolution(
                args.data, args.out, model=args.model, sizes=split_list(args.sizes, int),
                pretrain_size=args.pretrain_size, pretrain_steps=args.pretrain_steps,
                finetune_steps=args.finetune_steps, finetune_ratio=args.finetune_ratio,
                finetune_lr=args.finetune_lr, **common)
        else:
            summary = _transfer(args, common)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"vitlab study {args.study}: {e}", file=sys.stderr)
        return 2
    print(summary["table"], end="")
    if args.study == "resolution":
        from vitlab.study.resolution import describe

        text = describe(summary)
        print(text + "\n" if text else "", end="")
    steps = summary["plan"].get("steps")
    what = f"{steps} steps per cell" if isinstance(steps, int) else "steps per cell in the JSON"
    print(f"{args.out}/{args.study}.json, .md, .png  ({what}"
          + ("" if summary["complete"] else "; incomplete: rerun the same command to continue") + ")")
    return 0


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="study directory (plan, one run per cell, results, plots)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="scale the steps so the whole study fits this many minutes on this machine")
    p.add_argument("--config", default=None, help="training recipe: preset or config file (default: the study recipe, "
                   "vitlab.study.studies.STUDY_RECIPE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key in every cell "
                   "(repeatable)")
    p.set_defaults(func=run)


def _common(p: argparse.ArgumentParser, *, default_steps: bool = True) -> None:
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    _outputs(p)
    p.add_argument("--steps", type=int, default=None, help="optimisation steps of every cell (default 500 "
                   "unless --budget-minutes is given)")
    if default_steps:
        p.set_defaults(func=_with_default_steps)


def _with_default_steps(args: argparse.Namespace) -> int:
    if args.steps is None and args.budget_minutes is None:
        args.steps = 500
    return run(args)


def _data_size_defaults(args: argparse.Namespace) -> int:
    if args.steps_rule == "same":
        return _with_default_steps(args)
    return run(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="reproduce the paper's data-size, patch-size, position-embedding, "
                                            "resolution and transfer findings on image folders")
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    d = sub.add_parser("data-size", help="ViT vs ResNet on nested class-balanced subsets (paper Fig. 3/4)")
    _common(d, default_steps=False)
    d.set_defaults(func=_data_size_defaults)
    d.add_argument("--fractions", default="0.05,0.1,0.2,0.5,1.0", help="comma-separated fractions of train/")
    d.add_argument("--models", default=f"{DEFAULT_VIT},{DEFAULT_RESNET}",
                   help="comma-separated model specs NAME[:key=value...] (default: %(default)s)")
    d.add_argument("--subset-seed", type=int, default=0, help="seed of the subset (and validation) draw")
    d.add_argument("--steps-rule", default="proportional", choices=["proportional", "same"],
                   help="proportional (the paper): each subset trains --epochs passes with early stopping on a "
                        "validation split carved from train/, test evaluated once at the best validation step; "
                        "same: every cell trains --steps steps (default: %(default)s)")
    d.add_argument("--epochs", type=float, default=None,
                   help="proportional rule: passes over each subset (with --budget-minutes: chosen to fit)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="proportional rule: share of every class of train/ held out for validation")
    d.add_argument("--evaluations", type=int, default=10, help="proportional rule: validation evaluations per cell")
    d.add_argument("--patience", type=int, default=None,
                   help="proportional rule: stop a cell after this many evaluations without improvement "
                        "(default: train the whole schedule, keep the best)")
    d.add_argument("--min-steps", type=int, default=50, help="proportional rule: fewest steps of a cell")
    d.add_argument("--max-steps", type=int, default=None, help="proportional rule: most steps of a cell")
    ps = sub.add_parser("patch-size", help="same width/depth at patch 8, 4, 2 (sequence 16, 64, 256 at 32 px)")
    _common(ps)
    ps.add_argument("--model", default=DEFAULT_VIT, help="model spec; its patch size is replaced")
    ps.add_argument("--patch-sizes", default="8,4,2", help="comma-separated patch sizes")
    pe = sub.add_parser("pos-embed", help="none / learned-1d / learned-2d / sincos-2d (paper Appendix D.4)")
    _common(pe)
    pe.add_argument("--model", default=DEFAULT_VIT, help="model spec; its position embedding is replaced")
    pe.add_argument("--kinds", default="none,learned-1d,learned-2d,sincos-2d", help="comma-separated kinds")

    r = sub.add_parser("resolution", help="pre-train at a low resolution, fine-tune at the same and higher ones with "
                                          "and without interpolated position embeddings, vs scratch at equal compute "
                                          "(paper Sec. 3.2)")
    r.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    _outputs(r)
    r.add_argument("--model", default=DEFAULT_VIT, help="model spec (a ViT with a learned 1D position embedding)")
    r.add_argument("--pretrain-size", type=int, default=None, help="pre-training resolution (default: the recipe's "
                   "image_size, 32 px)")
    r.add_argument("--sizes", default="32,48,64", help="comma-separated fine-tuning resolutions, multiples of the "
                   "patch, at least the pre-training one")
    r.add_argument("--pretrain-steps", type=int, default=None)
    r.add_argument("--finetune-steps", type=int, default=None)
    r.add_argument("--finetune-ratio", type=float, default=0.25,
                   help="with --budget-minutes: fine-tuning steps as a share of pre-training steps")
    r.add_argument("--finetune-lr", type=float, default=None, help="lr of the paper's fine-tuning recipe (0.01)")

    t = sub.add_parser("transfer", help="pre-train on a source folder, fine-tune on a target folder (two recipes) "
                                        "vs scratch, plus few-shot linear evaluation (paper Sec. 3.2, 4.1)")
    t.add_argument("--source", default=None, help="ImageFolder root to pre-train on")
    t.add_argument("--target", default=None, help="ImageFolder root to transfer to")
    t.add_argument("--data", default=None, help="instead of --source/--target: one ImageFolder root split by class")
    t.add_argument("--source-classes", default=None, help="with --data: comma-separated class folders to pre-train on")
    t.add_argument("--target-classes", default=None, help="with --data: comma-separated class folders to transfer to")
    _outputs(t)
    t.add_argument("--model", default=DEFAULT_VIT, help="model spec (a ViT the official .npz can hold)")
    t.add_argument("--per-class", default="10,25,50,100,250,all",
                   help="target training sizes, images per class ('all': the whole folder)")
    t.add_argument("--pretrain-steps", type=int, default=None)
    t.add_argument("--target-epochs", type=float, default=None,
                   help="passes over each target subset (with --budget-minutes: chosen to fit)")
    t.add_argument("--pretrain-share", type=float, default=0.4,
                   help="with --budget-minutes: share of the budget for pre-training")
    t.add_argument("--finetune-size", type=int, default=None,
                   help="fine-tuning resolution (default: the pre-training one)")
    t.add_argument("--shots", default="1,5,10,25", help="few-shot: images per class")
    t.add_argument("--draws", type=int, default=5, help="few-shot: random draws per shot count")
    t.add_argument("--l2", default="1.0", help="few-shot regularisation(s); the first is the reported one")
    t.add_argument("--finetune-lr", type=float, default=None, help="lr of the paper's fine-tuning recipe (0.01)")
    t.add_argument("--min-steps", type=int, default=50, help="fewest steps of a target cell")
    t.add_argument("--max-steps", type=int, default=None, help="most steps of a target cell")
    t.add_argument("--subset-seed", type=int, default=0, help="seed of the target subsets and few-shot draws")
