"""``vitlab predict CHECKPOINT IMAGES...``: top-k labels with probabilities, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys


def run(args: argparse.Namespace) -> int:
    from vitlab.train.inference import load_for_inference, predict

    try:
        model, classes = load_for_inference(args.checkpoint, format=args.format)
        results = predict(model, args.images, classes=classes, top_k=args.top_k, normalize=args.normalize)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"vitlab predict: {e}", file=sys.stderr)
        return 2
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
    p.add_argument("checkpoint", help="checkpoint file (any format vitlab.load reads) or hf-hub:REPO")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--format", help="checkpoint format when the file does not say it")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--normalize", default="official", choices=["official", "imagenet", "none"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
