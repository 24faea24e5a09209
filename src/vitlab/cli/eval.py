"""``vitlab eval CHECKPOINT --data DIR``: top-1/top-5, loss and per-class accuracy; with ``--out DIR`` also the
confusion matrix (PNG) and the full result (JSON) there. Nothing is written beside the checkpoint, which the
command only reads."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vitlab.cli.common import UsageError, add_checkpoint_args, add_precision_arg, load_checkpoint, output_dir

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    from vitlab.train.evaluate import evaluate
    from vitlab.train.inference import resolve_eval_dir

    out = output_dir(args.out) if args.out else None
    model, classes = load_checkpoint(args)
    try:
        data = resolve_eval_dir(args.data)
        result = evaluate(model, data, normalize=args.normalize, batch_size=args.batch_size, workers=args.workers,
                          classes=classes, precision=args.precision, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"{args.checkpoint} on {data}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"loss {result['loss']:.4f}  ({result['n']} images)")
        for name, acc in result["per_class"].items():
            print(f"  {name:<20} {acc:6.2f}%")
        if result["skipped"]:
            print(f"skipped {len(result['skipped'])} unreadable image(s): " + ", ".join(result["skipped"]))
        sys.stdout.flush()
    if out is not None:
        write_figures(result, out, quiet=args.json)
    return 0


def write_figures(result: dict, out, *, quiet: bool = False) -> None:
    """``OUT/eval.json`` and ``OUT/confusion.png``; a failure to write them is a warning: the accuracy has been
    reported already."""
    from vitlab.io import write_json
    from vitlab.train.evaluate import plot_confusion

    try:
        write_json(out / "eval.json", result)
        plot_confusion(result, out / "confusion.png")
    except (OSError, ImportError, RuntimeError) as e:
        log.warning("vitlab eval: figures not written to %s (%s)", out, e)
        return
    if not quiet:
        print(f"confusion matrix: {out / 'confusion.png'}; result: {out / 'eval.json'}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on an image folder")
    add_checkpoint_args(p, image_size="evaluate at this resolution (the position embedding is resampled as the "
                                      "official code does)")
    p.add_argument("--data", required=True, help="folder of <class>/<image> (or a root with val/ or test/)")
    p.add_argument("--normalize", default="official", choices=["official", "imagenet", "none"],
                   help="input scaling (official: [-1, 1])")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    add_precision_arg(p)
    p.add_argument("--out", default=None,
                   help="folder for eval.json and confusion.png (default: nothing written)")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, loss, per_class, ...)")
    p.set_defaults(func=run)
