"""``vitlab eval CHECKPOINT --data DIR``: top-1/top-5, loss, per-class accuracy and a confusion-matrix PNG."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitlab.precision import PRECISIONS


def run(args: argparse.Namespace) -> int:
    from vitlab.train.evaluate import evaluate, plot_confusion
    from vitlab.train.inference import load_for_inference, resolve_eval_dir

    try:
        model, classes = load_for_inference(args.checkpoint, format=args.format, image_size=args.image_size)
        data = resolve_eval_dir(args.data)
        result = evaluate(model, data, normalize=args.normalize, batch_size=args.batch_size, workers=args.workers,
                          classes=classes, precision=args.precision, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"vitlab eval: {e}", file=sys.stderr)
        return 2
    confusion_png = Path(args.confusion) if args.confusion else None
    if confusion_png is None and Path(args.checkpoint).is_file():
        confusion_png = Path(args.checkpoint).parent / "confusion.png"
    if confusion_png is not None:
        result["confusion_png"] = str(plot_confusion(result, confusion_png))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint} on {data}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"loss {result['loss']:.4f}  ({result['n']} images)")
    for name, acc in result["per_class"].items():
        print(f"  {name:<20} {acc:6.2f}%")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable image(s): " + ", ".join(result["skipped"]))
    if confusion_png is not None:
        print(f"confusion matrix: {confusion_png}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on an image folder")
    p.add_argument("checkpoint", help="checkpoint file (any format vitlab.load reads) or hf-hub:REPO")
    p.add_argument("--data", required=True, help="folder of <class>/<image> (or a root with val/ or test/)")
    p.add_argument("--format", help="checkpoint format when the file does not say it (vitlab, npz, timm, hf)")
    p.add_argument("--image-size", type=int, help="evaluate at this resolution (position embedding resized)")
    p.add_argument("--normalize", default="official", choices=["official", "imagenet", "none"],
                   help="input scaling (official: [-1, 1])")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): bf16 where the device runs it natively, else fp32")
    p.add_argument("--confusion", help="confusion-matrix PNG path (default: next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, loss, per_class, ...)")
    p.set_defaults(func=run)
