"""``vitlab study {data-size,patch-size,pos-embed}``: the paper's findings reproduced on an image folder (see
:mod:`vitlab.study`). Each command resumes where it stopped and prints its result table."""

from __future__ import annotations

import argparse
import sys

# The models of the published results; kept here as text so building the parser imports nothing heavy.
DEFAULT_VIT = "ViT-Ti/16:patch_size=4:width=128:num_heads=2:depth=4:mlp_dim=256:classifier=gap"
DEFAULT_RESNET = "ResNet-26:width_factor=0.5:num_groups=16"



def run(args: argparse.Namespace) -> int:
    from vitlab.study import studies
    from vitlab.study.runner import split_list

    common = dict(steps=args.steps, budget_minutes=args.budget_minutes, recipe=args.config, sets=args.set)
    try:
        if args.study == "data-size":
            summary = studies.data_size(args.data, args.out, models=split_list(args.models),
                                        fractions=split_list(args.fractions, float), subset_seed=args.subset_seed,
                                        **common)
        elif args.study == "patch-size":
            summary = studies.patch_size(args.data, args.out, model=args.model,
                                         patch_sizes=split_list(args.patch_sizes, int), **common)
        else:
            summary = studies.pos_embed(args.data, args.out, model=args.model, kinds=split_list(args.kinds),
                                        **common)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"vitlab study {args.study}: {e}", file=sys.stderr)
        return 2
    print(summary["table"], end="")
    print(f"{args.out}/{args.study}.json, .md, .png  ({summary['plan']['steps']} steps per cell"
          + ("" if summary["complete"] else "; incomplete: rerun the same command to continue") + ")")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    p.add_argument("--out", required=True, help="study directory (plan, one run per cell, results, plots)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps of every cell (default 500 "
                   "unless --budget-minutes is given)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="scale the steps so the whole study fits this many minutes on this machine")
    p.add_argument("--config", default=None, help="training recipe: preset or config file (default: the study recipe, "
                   "vitlab.study.studies.STUDY_RECIPE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.set_defaults(func=_with_default_steps)


def _with_default_steps(args: argparse.Namespace) -> int:
    if args.steps is None and args.budget_minutes is None:
        args.steps = 500
    return run(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="reproduce the paper's data-size, patch-size and position-embedding "
                                            "findings on an image folder")
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    d = sub.add_parser("data-size", help="ViT vs ResNet on nested class-balanced subsets (paper Fig. 3/4)")
    _common(d)
    d.add_argument("--fractions", default="0.05,0.1,0.2,0.5,1.0", help="comma-separated fractions of train/")
    d.add_argument("--models", default=f"{DEFAULT_VIT},{DEFAULT_RESNET}",
                   help="comma-separated model specs NAME[:key=value...] (default: %(default)s)")
    d.add_argument("--subset-seed", type=int, default=0, help="seed of the subset draw")
    ps = sub.add_parser("patch-size", help="same width/depth at patch 8, 4, 2 (sequence 16, 64, 256 at 32 px)")
    _common(ps)
    ps.add_argument("--model", default=DEFAULT_VIT, help="model spec; its patch size is replaced")
    ps.add_argument("--patch-sizes", default="8,4,2", help="comma-separated patch sizes")
    pe = sub.add_parser("pos-embed", help="none / learned-1d / learned-2d / sincos-2d (paper Appendix D.4)")
    _common(pe)
    pe.add_argument("--model", default=DEFAULT_VIT, help="model spec; its position embedding is replaced")
    pe.add_argument("--kinds", default="none,learned-1d,learned-2d,sincos-2d", help="comma-separated kinds")
