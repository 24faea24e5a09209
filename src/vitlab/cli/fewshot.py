"""``vitlab fewshot CHECKPOINT --data DIR --shots 1,5,10,25``: few-shot linear evaluation of frozen features
(paper Sec. 4.1; see :mod:`vitlab.study.fewshot`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    import torch

    import vitlab
    from vitlab.study.fewshot import fewshot_evaluate
    from vitlab.study.runner import split_list

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shots = split_list(args.shots, int)
        l2s = split_list(args.l2, float)
        model = vitlab.load(args.checkpoint, **({"format": args.format} if args.format else {}))
        result = fewshot_evaluate(model, args.data, shots, draws=args.draws, l2s=l2s, seed=args.seed,
                                  image_size=args.image_size, normalize=args.normalize, max_test=args.max_test,
                                  progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as e:
        print(f"vitlab fewshot: {e}", file=sys.stderr)
        return 2
    result["checkpoint"] = str(args.checkpoint)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
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
    p.add_argument("checkpoint", help="any checkpoint vitlab.load reads")
    p.add_argument("--data", required=True, help="ImageFolder root: shots from train/, evaluation on val/ or test/")
    p.add_argument("--shots", default="1,5,10,25", help="comma-separated images per class")
    p.add_argument("--draws", type=int, default=5, help="random draws of the shots per shot count")
    p.add_argument("--l2", default="1.0", help="regularisation strength(s); the first is the reported one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--normalize", default="official", choices=["official", "imagenet", "none"],
                   help="pixel normalisation the model was trained with")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on a random sample of this many test images")
    p.add_argument("--format", default=None, help="checkpoint format when the file does not say it")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
