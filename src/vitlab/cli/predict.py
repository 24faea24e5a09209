"""``vitlab predict CHECKPOINT IMAGES...``: top-k labels with probabilities, as a table or JSON."""

from __future__ import annotations

import argparse
import json

from vitlab.cli.common import UsageError, add_checkpoint_args, add_precision_arg, load_checkpoint


def run(args: argparse.Namespace) -> int:
    from vitlab.train.inference import expand_images, predict

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    try:
        images = expand_images(args.images)  # before loading: a wrong path is the quicker error
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    model, classes = load_checkpoint(args)
    results = predict(model, images, classes=classes, top_k=args.top_k, normalize=args.normalize,
                      precision=args.precision)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: unreadable ({r['error']})")
                continue
            print(r["path"])
            for t in r["top"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['label']}")
    return 1 if any("error" in r for r in results) else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k labels of image files or folders")
    add_checkpoint_args(p, image_size="predict at this resolution (the position embedding is resampled)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--normalize", default="official", choices=["official", "imagenet", "none"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_precision_arg(p)
    p.set_defaults(func=run)
