"""``vitlab fewshot CHECKPOINT --data DIR --shots 1,5,10,25``: few-shot linear evaluation of frozen features
(paper Sec. 4.1; see :mod:`vitlab.study.fewshot`)."""

from __future__ import annotations

import argparse
import json
import sys

from vitlab.cli.common import UsageError, add_checkpoint_args, add_precision_arg, load_checkpoint, output_file


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.io import write_json
    from vitlab.study.fewshot import fewshot_evaluate
    from vitlab.study.runner import split_list

    if args.threads:
        torch.set_num_threads(args.threads)
    out = output_file(args.out) if args.out else None
    model, _ = load_checkpoint(args)  # at --image-size, the position embedding resampled
    try:
        shots = split_list(args.shots, int)
        l2s = split_list(args.l2, float)
        result = fewshot_evaluate(model, args.data, shots, draws=args.draws, l2s=l2s, seed=args.seed,
                                  normalize=args.normalize, max_test=args.max_test, precision=args.precision,
                                  progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    result["checkpoint"] = str(args.checkpoint)
    if out is not None:
        write_json(out, result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'shots':>5} {'mean %':>8} {'std':>6}  draws (l2={l2s[0]:g}, {result['num_test']} test images)")
    for k, r in result["shots"].items():
        print(f"{k:>5} {r['mean']:>8.2f} {r['std']:>6.2f}  " + " ".join(f"{a:.1f}" for a in r["draws"]))
    if len(l2s) > 1:
        print("other l2 (mean %): " + "; ".join(
            f"{k}-shot " + ", ".join(f"{l2}: {v['mean']:.1f}" for l2, v in r["by_l2"].items())
            for k, r in result["shots"].items()))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fewshot", help="few-shot linear evaluation of a checkpoint's frozen features")
    add_checkpoint_args(p, image_size="input size (default: the model's); the position embedding is resampled to "
                                      "it as the official code does")
    p.add_argument("--data", required=True, help="ImageFolder root: shots from train/, evaluation on val/ or test/")
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated images per class")
    p.add_argument("--draws", type=int, default=5, help="random draws of the shots per shot count")
    p.add_argument("--l2", default="1.0", help="regularisation strength(s); the first is the reported one")
    p.add_argument("--seed", type=int, default=0)
    add_precision_arg(p)
    p.add_argument("--normalize", default="official", choices=["official", "imagenet", "none"],
                   help="pixel normalisation the model was trained with")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on a random sample of this many test images")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
